//! The disk cache's eviction policy: a size quota with least-recently-used eviction and a
//! maximum idle age, as users configure an nginx caching proxy today (`max_size=100g
//! inactive=30d`, seed 001 in docs/goals.md). Pure: the caller passes the clock (seconds since
//! the Unix epoch, so that file modification times can rebuild the order after a restart) and
//! deletes the files this module names.
//!
//! Memory is the point of the layout (issue 14: a million entries within 64 MiB of RSS). An
//! entry is its decoded file name (20 bytes for a narinfo, 32 for a NAR), its size, its last
//! use and a use counter, in a slot of 32 or 44 bytes, plus 4.6 to 6.9 bytes of hash index (a
//! `u32` per bucket, load between 7/12 and 7/8): 37–39 bytes per narinfo, 49–51 per NAR, where
//! the former `HashMap<String, _>` plus `BTreeMap<_, String>` took about 300. No key is stored
//! twice and nothing is allocated per entry:
//! - slots live in slabs of fixed-size chunks, so growing never copies (nor briefly doubles)
//!   what is there; freed slots are reused. Memory follows the largest number of entries
//!   held, not the current one.
//! - the hash index is open addressing with linear probing over `u32` slot handles, keyed
//!   with a random seed (NAR file names derive from URLs an upstream chooses; a fixed hash
//!   would let it pile names into one probe run).
//! - sizes are exact below 2 GiB and counted in whole KiB (rounded up) above; an entry of
//!   2 TiB or more is never admitted. Last use is in whole seconds (file modification times
//!   are persisted at most hourly anyway); within one second, the use counter keeps the
//!   order in which entries were stored or used.
//!
//! Eviction follows that order exactly, without a second ordered copy of every key: an
//! ordered set holds only the oldest candidates (up to [`CANDIDATES`], at most twice that),
//! with the promise that every entry at or below its bound `covers` is in it. Evicting or
//! expiring takes the oldest candidate; when none is left, one pass over the slabs collects
//! the next ones (a few milliseconds for a million entries, once per [`CANDIDATES`]
//! evictions, touches of candidates or removals).

use std::collections::{BTreeSet, BinaryHeap};
use std::hash::{BuildHasher, RandomState};

/// How many of the oldest entries are kept ordered between passes over the slabs.
pub(crate) const CANDIDATES: usize = 1024;

/// The largest entry the index can count (see [`encode_size`]).
pub(crate) const MAX_ENTRY_BYTES: u64 = (KIB_UNITS as u64 - 2) * 1024;

/// Limits of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Total size of all entries, in bytes.
    pub(crate) max_bytes: u64,
    /// An entry not used for longer than this is dropped (nginx's `inactive`).
    pub(crate) max_idle_secs: u64,
}

/// An entry, by its decoded file name: the hash part of a narinfo's store path, or the
/// SHA-256 that names a NAR's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Narinfo([u8; 20]),
    Nar([u8; 32]),
}

/// The result of looking an entry up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touch {
    /// Present; its last use is now `now`.
    Hit,
    /// Present but idle for longer than the policy allows: removed, the caller deletes it.
    Expired,
    Absent,
}

/// A free slot's size, and an empty bucket of the index.
const FREE: u32 = u32::MAX;
/// Sizes with this bit set count KiB.
const KIB_UNITS: u32 = 1 << 31;
/// Set in the handles of NAR slots.
const NAR_BIT: u32 = 1 << 31;
/// Slots per slab chunk: 112 KiB (narinfos) or 160 KiB (NARs), the most a slab holds unused
/// beyond its free slots.
const CHUNK: usize = 4096;
/// (last use, use counter, handle): unique, because handles are.
type Order = (u32, u32, u32);
/// An order key that covers every entry (no handle is `u32::MAX`).
const ALL: Order = (u32::MAX, u32::MAX, u32::MAX);

/// Exact below 2 GiB; above, KiB rounded up, so the total never undercounts.
fn encode_size(bytes: u64) -> u32 {
    if bytes < u64::from(KIB_UNITS) {
        bytes as u32
    } else {
        KIB_UNITS | bytes.div_ceil(1024).min(u64::from(KIB_UNITS) - 2) as u32
    }
}

fn decode_size(s: u32) -> u64 {
    if s & KIB_UNITS == 0 {
        u64::from(s)
    } else {
        u64::from(s & !KIB_UNITS) * 1024
    }
}

fn secs(t: u64) -> u32 {
    t.min(u64::from(u32::MAX)) as u32
}

#[derive(Debug, Clone, Copy)]
struct Slot<const N: usize> {
    name: [u8; N],
    /// [`encode_size`], or [`FREE`].
    size: u32,
    /// Last use in seconds; in a free slot, the next free slot.
    last: u32,
    /// When in that second: [`Lru`]'s use counter.
    seq: u32,
}

/// Slots in chunks that never move; freed slots form a list threaded through `last`.
#[derive(Debug)]
struct Slab<const N: usize> {
    chunks: Vec<Box<[Slot<N>]>>,
    used: u32,
    free: u32,
}

impl<const N: usize> Slab<N> {
    fn new() -> Self {
        Slab {
            chunks: Vec::new(),
            used: 0,
            free: FREE,
        }
    }

    fn get(&self, i: u32) -> &Slot<N> {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    fn get_mut(&mut self, i: u32) -> &mut Slot<N> {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    /// A slot for `s`, or None when the handle space (2^31 - 1 slots) is full.
    fn alloc(&mut self, s: Slot<N>) -> Option<u32> {
        if self.free != FREE {
            let i = self.free;
            self.free = self.get(i).last;
            *self.get_mut(i) = s;
            return Some(i);
        }
        if self.used >= NAR_BIT - 1 {
            return None;
        }
        let i = self.used;
        if (i as usize).is_multiple_of(CHUNK) {
            let empty = Slot {
                name: [0; N],
                size: FREE,
                last: FREE,
                seq: 0,
            };
            self.chunks.push(vec![empty; CHUNK].into_boxed_slice());
        }
        self.used += 1;
        *self.get_mut(i) = s;
        Some(i)
    }

    fn release(&mut self, i: u32) {
        let next = self.free;
        let s = self.get_mut(i);
        s.size = FREE;
        s.last = next;
        self.free = i;
    }

    /// The order key of every live slot, with `bit` in its handle.
    fn live(&self, bit: u32) -> impl Iterator<Item = Order> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .take(self.used as usize)
            .enumerate()
            .filter(|(_, s)| s.size != FREE)
            .map(move |(i, s)| (s.last, s.seq, i as u32 | bit))
    }

    fn bytes(&self) -> usize {
        self.chunks.len() * CHUNK * size_of::<Slot<N>>()
    }
}

/// Entries ordered by last use (seconds, then order of use).
#[derive(Debug)]
pub(crate) struct Lru {
    policy: Policy,
    narinfos: Slab<20>,
    nars: Slab<32>,
    /// Slot handles ([`NAR_BIT`] for NARs), [`FREE`] when empty.
    buckets: Vec<u32>,
    seed: RandomState,
    len: usize,
    total: u64,
    /// Counts uses, to order those within one second.
    seq: u32,
    /// The oldest entries: every entry whose order key is at most `covers`.
    order: BTreeSet<Order>,
    covers: Order,
    candidates: usize,
}

impl Lru {
    pub(crate) fn new(policy: Policy) -> Self {
        Self::with_candidates(policy, CANDIDATES)
    }

    /// With `candidates` ordered between passes (small in tests, to exercise the passes).
    fn with_candidates(policy: Policy, candidates: usize) -> Self {
        Lru {
            policy,
            narinfos: Slab::new(),
            nars: Slab::new(),
            buckets: vec![FREE; 16],
            seed: RandomState::new(),
            len: 0,
            total: 0,
            seq: 0,
            order: BTreeSet::new(),
            covers: ALL,
            candidates: candidates.max(1),
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        self.policy
    }

    /// Bytes held by all entries.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.total
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The heap memory the index holds (slabs, hash index, candidates), for logs and tests.
    pub(crate) fn memory_bytes(&self) -> usize {
        // A B-tree node holds up to 11 keys of 12 bytes in about 250 bytes.
        self.narinfos.bytes() + self.nars.bytes() + self.buckets.len() * 4 + self.order.len() * 24
    }

    /// Whether an object of `size` bytes may be stored at all: one larger than the whole
    /// quota would only evict everything and then itself.
    pub(crate) fn admits(&self, size: u64) -> bool {
        size <= self.policy.max_bytes && size <= MAX_ENTRY_BYTES
    }

    fn expired(&self, last: u32, now: u64) -> bool {
        now.saturating_sub(u64::from(last)) > self.policy.max_idle_secs
    }

    fn key_of(&self, h: u32) -> Key {
        if h & NAR_BIT == 0 {
            Key::Narinfo(self.narinfos.get(h).name)
        } else {
            Key::Nar(self.nars.get(h & !NAR_BIT).name)
        }
    }

    /// (size, order key) of a live handle.
    fn meta(&self, h: u32) -> (u32, Order) {
        let (size, last, seq) = if h & NAR_BIT == 0 {
            let s = self.narinfos.get(h);
            (s.size, s.last, s.seq)
        } else {
            let s = self.nars.get(h & !NAR_BIT);
            (s.size, s.last, s.seq)
        };
        (size, (last, seq, h))
    }

    /// Stamps a live handle as used at `last` (seconds), after every earlier use.
    fn stamp(&mut self, h: u32, last: u32) -> Order {
        // Wraps after 2^32 uses: only uses within that one second are misordered.
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let s = if h & NAR_BIT == 0 {
            let s = self.narinfos.get_mut(h);
            (&mut s.last, &mut s.seq)
        } else {
            let s = self.nars.get_mut(h & !NAR_BIT);
            (&mut s.last, &mut s.seq)
        };
        (*s.0, *s.1) = (last, seq);
        (last, seq, h)
    }

    fn is(&self, h: u32, key: &Key) -> bool {
        match key {
            Key::Narinfo(n) => h & NAR_BIT == 0 && self.narinfos.get(h).name == *n,
            Key::Nar(n) => h & NAR_BIT != 0 && self.nars.get(h & !NAR_BIT).name == *n,
        }
    }

    /// The bucket `key` hashes to: the hash scaled to the index's length (any length, so
    /// that it can grow by half rather than double).
    fn home(&self, key: &Key) -> usize {
        let hash = self.seed.hash_one(key);
        ((u128::from(hash) * self.buckets.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.buckets.len() {
            0
        } else {
            i + 1
        }
    }

    /// (bucket, handle) of `key`.
    fn find(&self, key: &Key) -> Option<(usize, u32)> {
        let mut i = self.home(key);
        loop {
            let h = self.buckets[i];
            if h == FREE {
                return None;
            }
            if self.is(h, key) {
                return Some((i, h));
            }
            i = self.next(i);
        }
    }

    fn place(&mut self, h: u32) {
        let mut i = self.home(&self.key_of(h));
        while self.buckets[i] != FREE {
            i = self.next(i);
        }
        self.buckets[i] = h;
    }

    /// Empties bucket `i`, moving later members of its probe run back so that none is
    /// separated from its home by an empty bucket (no tombstones to clean up later).
    fn unlink(&mut self, mut i: usize) {
        let mut j = i;
        loop {
            j = self.next(j);
            let h = self.buckets[j];
            if h == FREE {
                break;
            }
            let home = self.home(&self.key_of(h));
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.buckets[i] = h;
                i = j;
            }
        }
        self.buckets[i] = FREE;
    }

    /// Grows the index by half once it would be more than 7/8 full: at most 7 bytes of
    /// index per entry (doubling would allow 9), for a few more rehashes while it grows.
    fn reserve_one(&mut self) {
        if (self.len + 1) * 8 <= self.buckets.len() * 7 {
            return;
        }
        self.buckets = vec![FREE; self.buckets.len() * 3 / 2];
        // In slab order rather than bucket order: the names are read in sequence instead of
        // at random, which shortens the time the lock is held (at a million entries, about
        // 40 ms instead of 65).
        for i in 0..self.narinfos.used {
            if self.narinfos.get(i).size != FREE {
                self.place(i);
            }
        }
        for i in 0..self.nars.used {
            if self.nars.get(i).size != FREE {
                self.place(i | NAR_BIT);
            }
        }
    }

    /// Keeps the candidates promise for an entry that now has order key `k`.
    fn note(&mut self, k: Order) {
        if k > self.covers {
            return;
        }
        self.order.insert(k);
        if self.order.len() > 2 * self.candidates {
            // Keep the oldest; the bound drops to the newest of those kept.
            if let Some(&cut) = self.order.iter().nth(self.candidates) {
                self.order.split_off(&cut);
            }
            self.covers = self.order.last().copied().unwrap_or(ALL);
        }
    }

    /// One pass over the slabs for the next candidates.
    fn refill(&mut self) {
        let mut heap = BinaryHeap::with_capacity(self.candidates + 1);
        for k in self.narinfos.live(0).chain(self.nars.live(NAR_BIT)) {
            if heap.len() < self.candidates {
                heap.push(k);
            } else if heap.peek().is_some_and(|&top| k < top) {
                heap.pop();
                heap.push(k);
            }
        }
        self.covers = match heap.peek() {
            Some(&top) if self.len > self.candidates => top,
            _ => ALL,
        };
        self.order = heap.into_iter().collect();
    }

    /// The least recently used entry's order key.
    fn oldest(&mut self) -> Option<Order> {
        if self.len == 0 {
            self.covers = ALL;
            return None;
        }
        if self.order.is_empty() {
            self.refill();
        }
        self.order.first().copied()
    }

    /// Marks `key` used at `now`.
    pub(crate) fn touch(&mut self, key: &Key, now: u64) -> Touch {
        let Some((_, h)) = self.find(key) else {
            return Touch::Absent;
        };
        let (_, old) = self.meta(h);
        if self.expired(old.0, now) {
            self.remove(key);
            return Touch::Expired;
        }
        self.order.remove(&old);
        let new = self.stamp(h, secs(now).max(old.0));
        self.note(new);
        Touch::Hit
    }

    /// The last use of `key`, if present.
    pub(crate) fn last_use(&self, key: &Key) -> Option<u64> {
        self.find(key).map(|(_, h)| u64::from(self.meta(h).1.0))
    }

    /// Adds (or replaces) `key` with `size` bytes, last used at `at`, and returns the keys to
    /// delete: expired entries, then the least recently used ones until the total fits the
    /// quota. `key` itself is returned when it does not fit at all ([`Lru::admits`]).
    pub(crate) fn insert(&mut self, key: Key, size: u64, at: u64, now: u64) -> Vec<Key> {
        self.remove(&key);
        if !self.admits(size) {
            return vec![key];
        }
        // Before the slot exists: growing places every live slot.
        self.reserve_one();
        let size = encode_size(size);
        let (last, seq) = (0, 0);
        let h = match key {
            Key::Narinfo(name) => self.narinfos.alloc(Slot {
                name,
                size,
                last,
                seq,
            }),
            Key::Nar(name) => self
                .nars
                .alloc(Slot {
                    name,
                    size,
                    last,
                    seq,
                })
                .map(|i| i | NAR_BIT),
        };
        let Some(h) = h else {
            return vec![key];
        };
        let k = self.stamp(h, secs(at));
        self.place(h);
        self.len += 1;
        self.total += decode_size(size);
        self.note(k);
        let mut evicted = self.expire(now);
        while self.total > self.policy.max_bytes {
            let Some((_, _, h)) = self.oldest() else {
                break;
            };
            let k = self.key_of(h);
            self.remove(&k);
            evicted.push(k);
        }
        evicted
    }

    /// Removes entries idle for longer than the policy allows and returns them.
    pub(crate) fn expire(&mut self, now: u64) -> Vec<Key> {
        let mut out = Vec::new();
        while let Some((last, _, h)) = self.oldest() {
            if !self.expired(last, now) {
                break;
            }
            let k = self.key_of(h);
            self.remove(&k);
            out.push(k);
        }
        out
    }

    /// Checks the index against the slabs: each live slot in exactly one bucket, found from
    /// its name; the candidates hold every entry up to their bound.
    #[cfg(test)]
    fn check(&self) {
        let mut handles: Vec<u32> = self
            .buckets
            .iter()
            .copied()
            .filter(|&h| h != FREE)
            .collect();
        handles.sort_unstable();
        let mut live: Vec<Order> = self
            .narinfos
            .live(0)
            .chain(self.nars.live(NAR_BIT))
            .collect();
        let mut want: Vec<u32> = live.iter().map(|k| k.2).collect();
        want.sort_unstable();
        assert_eq!(handles, want);
        assert_eq!(live.len(), self.len);
        for &h in &handles {
            assert_eq!(self.find(&self.key_of(h)).map(|(_, g)| g), Some(h));
        }
        live.retain(|k| *k <= self.covers);
        let listed: Vec<Order> = self.order.iter().copied().collect();
        live.sort_unstable();
        assert_eq!(listed, live);
    }

    /// Forgets `key` (its file is gone or unusable).
    pub(crate) fn remove(&mut self, key: &Key) -> bool {
        let Some((i, h)) = self.find(key) else {
            return false;
        };
        let (size, k) = self.meta(h);
        self.unlink(i);
        self.order.remove(&k);
        self.total -= decode_size(size);
        self.len -= 1;
        if h & NAR_BIT == 0 {
            self.narinfos.release(h);
        } else {
            self.nars.release(h & !NAR_BIT);
        }
        true
    }
}

#[cfg(test)]
mod tests;
