//! The disk cache's eviction policy: a size quota with least-recently-used eviction and a
//! maximum idle age, as users configure an nginx caching proxy today (`max_size=100g
//! inactive=30d`, seed 001 in docs/goals.md). Pure: the caller passes the clock (milliseconds since the Unix
//! epoch, so that file modification times can rebuild the order after a restart) and deletes
//! the files this module names.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Limits of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Total size of all entries, in bytes.
    pub max_bytes: u64,
    /// An entry not used for longer than this is dropped (nginx's `inactive`).
    pub max_idle_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    last: u64,
    seq: u64,
}

/// The result of looking an entry up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// Present; its last use is now `now`.
    Hit,
    /// Present but idle for longer than the policy allows: removed, the caller deletes it.
    Expired,
    Absent,
}

/// Entries ordered by last use. Ties (same millisecond) are broken by insertion sequence.
#[derive(Debug)]
pub struct Lru<K> {
    policy: Policy,
    entries: HashMap<K, Entry>,
    order: BTreeMap<(u64, u64), K>,
    total: u64,
    seq: u64,
}

impl<K: Clone + Eq + Hash> Lru<K> {
    pub fn new(policy: Policy) -> Self {
        Lru {
            policy,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            total: 0,
            seq: 0,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Bytes held by all entries.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether an object of `size` bytes may be stored at all: one larger than the whole
    /// quota would only evict everything and then itself.
    pub fn admits(&self, size: u64) -> bool {
        size <= self.policy.max_bytes
    }

    fn expired(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.last) > self.policy.max_idle_ms
    }

    /// Marks `key` used at `now`.
    pub fn touch(&mut self, key: &K, now: u64) -> Touch {
        let Some(e) = self.entries.get(key).copied() else {
            return Touch::Absent;
        };
        if self.expired(&e, now) {
            self.remove(key);
            return Touch::Expired;
        }
        self.order.remove(&(e.last, e.seq));
        self.seq += 1;
        let e = Entry {
            last: now.max(e.last),
            seq: self.seq,
            ..e
        };
        self.order.insert((e.last, e.seq), key.clone());
        self.entries.insert(key.clone(), e);
        Touch::Hit
    }

    /// The last use of `key`, if present.
    pub fn last_use(&self, key: &K) -> Option<u64> {
        self.entries.get(key).map(|e| e.last)
    }

    /// Adds (or replaces) `key` with `size` bytes, last used at `at`, and returns the keys to
    /// delete: expired entries, then the least recently used ones until the total fits the
    /// quota. `key` itself is returned when it does not fit at all ([`Lru::admits`]).
    pub fn insert(&mut self, key: K, size: u64, at: u64, now: u64) -> Vec<K> {
        self.remove(&key);
        let mut evicted = Vec::new();
        if !self.admits(size) {
            evicted.push(key);
            return evicted;
        }
        self.seq += 1;
        let e = Entry {
            size,
            last: at,
            seq: self.seq,
        };
        self.order.insert((e.last, e.seq), key.clone());
        self.entries.insert(key.clone(), e);
        self.total += size;
        evicted.extend(self.expire(now));
        while self.total > self.policy.max_bytes {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&k) {
                self.total -= e.size;
            }
            evicted.push(k);
        }
        evicted
    }

    /// Removes entries idle for longer than the policy allows and returns them.
    pub fn expire(&mut self, now: u64) -> Vec<K> {
        let mut out = Vec::new();
        while let Some((&(last, _), _)) = self.order.first_key_value() {
            if now.saturating_sub(last) <= self.policy.max_idle_ms {
                break;
            }
            if let Some((_, k)) = self.order.pop_first() {
                if let Some(e) = self.entries.remove(&k) {
                    self.total -= e.size;
                }
                out.push(k);
            }
        }
        out
    }

    /// Forgets `key` (its file is gone or unusable).
    pub fn remove(&mut self, key: &K) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.order.remove(&(e.last, e.seq));
                self.total -= e.size;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    fn lru(max_bytes: u64) -> Lru<&'static str> {
        Lru::new(Policy {
            max_bytes,
            max_idle_ms: 30 * DAY,
        })
    }

    #[test]
    fn evicts_least_recently_used_until_under_quota() {
        let mut l = lru(100);
        assert!(l.insert("a", 40, 1, 1).is_empty());
        assert!(l.insert("b", 40, 2, 2).is_empty());
        // "a" is used again: "b" is now the oldest.
        assert_eq!(l.touch(&"a", 3), Touch::Hit);
        assert_eq!(l.insert("c", 40, 4, 4), vec!["b"]);
        assert_eq!(l.total_bytes(), 80);
        // A big one pushes out both others.
        assert_eq!(l.insert("d", 90, 5, 5), vec!["a", "c"]);
        assert_eq!(l.total_bytes(), 90);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn same_millisecond_keeps_insertion_order() {
        let mut l = lru(2);
        l.insert("a", 1, 7, 7);
        l.insert("b", 1, 7, 7);
        assert_eq!(l.insert("c", 1, 7, 7), vec!["a"]);
    }

    #[test]
    fn replacing_an_entry_counts_it_once() {
        let mut l = lru(100);
        l.insert("a", 60, 1, 1);
        assert!(l.insert("a", 70, 2, 2).is_empty());
        assert_eq!(l.total_bytes(), 70);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn larger_than_the_quota_is_not_admitted() {
        let mut l = lru(100);
        l.insert("a", 50, 1, 1);
        assert!(!l.admits(101));
        assert_eq!(l.insert("huge", 101, 2, 2), vec!["huge"]);
        assert_eq!(l.total_bytes(), 50, "nothing else was evicted");
        assert_eq!(l.touch(&"huge", 3), Touch::Absent);
    }

    #[test]
    fn idle_entries_expire() {
        let mut l = lru(1000);
        l.insert("old", 10, 0, 0);
        l.insert("new", 10, 20 * DAY, 20 * DAY);
        // At day 31 "old" has been idle 31 days: expired on touch...
        assert_eq!(l.touch(&"old", 31 * DAY), Touch::Expired);
        assert_eq!(l.total_bytes(), 10);
        // ...and "new" is removed by a sweep once idle for more than 30 days.
        assert!(l.expire(49 * DAY).is_empty());
        assert_eq!(l.expire(51 * DAY), vec!["new"]);
        assert!(l.is_empty());
    }

    #[test]
    fn a_touch_keeps_an_entry_alive() {
        let mut l = lru(1000);
        l.insert("a", 10, 0, 0);
        assert_eq!(l.touch(&"a", 29 * DAY), Touch::Hit);
        assert_eq!(l.touch(&"a", 58 * DAY), Touch::Hit);
        assert_eq!(l.last_use(&"a"), Some(58 * DAY));
    }

    #[test]
    fn insert_sweeps_expired_entries_and_rebuild_order_follows_times() {
        // A rebuild from the directory inserts files with their modification times, in any
        // order; eviction still follows the times.
        let mut l = lru(30);
        l.insert("mid", 10, 5, 100);
        l.insert("oldest", 10, 1, 100);
        l.insert("newest", 10, 9, 100);
        assert_eq!(l.insert("x", 10, 100, 100), vec!["oldest"]);
        let mut l = Lru::new(Policy {
            max_bytes: 1000,
            max_idle_ms: 10,
        });
        l.insert("stale", 1, 0, 0);
        assert_eq!(l.insert("fresh", 1, 50, 50), vec!["stale"]);
    }
}
