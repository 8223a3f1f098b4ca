use super::*;

const DAY: u64 = 24 * 3600;

fn lru(max_bytes: u64) -> Lru {
    Lru::new(Policy {
        max_bytes,
        max_idle_secs: 30 * DAY,
    })
}

/// A narinfo key named by a small number.
fn k(n: u32) -> Key {
    let mut name = [0; 20];
    name[..4].copy_from_slice(&n.to_le_bytes());
    Key::Narinfo(name)
}

fn nar(n: u32) -> Key {
    let mut name = [0; 32];
    name[..4].copy_from_slice(&n.to_le_bytes());
    Key::Nar(name)
}

#[test]
fn evicts_least_recently_used_until_under_quota() {
    let mut l = lru(100);
    assert!(l.insert(k(1), 40, 1, 1).is_empty());
    assert!(l.insert(nar(2), 40, 2, 2).is_empty());
    // 1 is used again: 2 is now the oldest.
    assert_eq!(l.touch(&k(1), 3), Touch::Hit);
    assert_eq!(l.insert(k(3), 40, 4, 4), vec![nar(2)]);
    assert_eq!(l.total_bytes(), 80);
    // A big one pushes out both others, oldest first.
    assert_eq!(l.insert(nar(4), 90, 5, 5), vec![k(1), k(3)]);
    assert_eq!(l.total_bytes(), 90);
    assert_eq!(l.len(), 1);
}

#[test]
fn the_same_second_keeps_the_order_of_use() {
    // Last use is kept in whole seconds; within one second, entries go in the order they
    // were stored or used.
    let mut l = lru(2);
    l.insert(k(1), 1, 7, 7);
    l.insert(k(2), 1, 7, 7);
    assert_eq!(l.insert(k(3), 1, 7, 7), vec![k(1)]);
    assert_eq!(l.touch(&k(2), 7), Touch::Hit);
    assert_eq!(l.insert(k(4), 1, 7, 7), vec![k(3)]);
}

#[test]
fn replacing_an_entry_counts_it_once() {
    let mut l = lru(100);
    l.insert(k(1), 60, 1, 1);
    assert!(l.insert(k(1), 70, 2, 2).is_empty());
    assert_eq!(l.total_bytes(), 70);
    assert_eq!(l.len(), 1);
}

#[test]
fn narinfo_and_nar_names_with_the_same_bytes_are_different_entries() {
    let mut l = lru(100);
    l.insert(k(1), 10, 1, 1);
    l.insert(nar(1), 20, 2, 2);
    assert_eq!(l.len(), 2);
    assert!(l.remove(&nar(1)));
    assert_eq!(l.touch(&k(1), 3), Touch::Hit);
    assert_eq!(l.total_bytes(), 10);
}

#[test]
fn larger_than_the_quota_is_not_admitted() {
    let mut l = lru(100);
    l.insert(k(1), 50, 1, 1);
    assert!(!l.admits(101));
    assert_eq!(l.insert(k(9), 101, 2, 2), vec![k(9)]);
    assert_eq!(l.total_bytes(), 50, "nothing else was evicted");
    assert_eq!(l.touch(&k(9), 3), Touch::Absent);
    let l = lru(u64::MAX);
    assert!(l.admits(MAX_ENTRY_BYTES) && !l.admits(MAX_ENTRY_BYTES + 1));
}

#[test]
fn sizes_are_exact_below_2_gib_and_rounded_up_to_kib_above() {
    for b in [0, 1, 1023, (1 << 31) - 1] {
        assert_eq!(decode_size(encode_size(b)), b);
    }
    assert_eq!(decode_size(encode_size(1 << 31)), 1 << 31);
    assert_eq!(decode_size(encode_size((1 << 31) + 1)), (1 << 31) + 1024);
    assert_eq!(decode_size(encode_size(MAX_ENTRY_BYTES)), MAX_ENTRY_BYTES);
    assert_ne!(encode_size(u64::MAX), FREE);
    // The total is the sum of the counted sizes, so removing never underflows.
    let mut l = lru(u64::MAX);
    l.insert(nar(1), (5 << 30) + 1, 1, 1);
    assert_eq!(l.total_bytes(), (5 << 30) + 1024);
    assert!(l.remove(&nar(1)));
    assert_eq!(l.total_bytes(), 0);
}

#[test]
fn idle_entries_expire() {
    let mut l = lru(1000);
    l.insert(k(1), 10, 0, 0);
    l.insert(k(2), 10, 20 * DAY, 20 * DAY);
    // At day 31, 1 has been idle 31 days: expired on touch...
    assert_eq!(l.touch(&k(1), 31 * DAY), Touch::Expired);
    assert_eq!(l.total_bytes(), 10);
    // ...and 2 is removed by a sweep once idle for more than 30 days.
    assert!(l.expire(49 * DAY).is_empty());
    assert_eq!(l.expire(51 * DAY), vec![k(2)]);
    assert!(l.is_empty());
}

#[test]
fn a_touch_keeps_an_entry_alive() {
    let mut l = lru(1000);
    l.insert(k(1), 10, 0, 0);
    assert_eq!(l.touch(&k(1), 29 * DAY), Touch::Hit);
    assert_eq!(l.touch(&k(1), 58 * DAY), Touch::Hit);
    assert_eq!(l.last_use(&k(1)), Some(58 * DAY));
}

#[test]
fn insert_sweeps_expired_entries_and_rebuild_order_follows_times() {
    // A rebuild from the directory inserts files with their modification times, in any
    // order; eviction still follows the times.
    let mut l = lru(30);
    l.insert(k(5), 10, 5, 100);
    l.insert(k(1), 10, 1, 100);
    l.insert(k(9), 10, 9, 100);
    assert_eq!(l.insert(k(100), 10, 100, 100), vec![k(1)]);
    let mut l = Lru::new(Policy {
        max_bytes: 1000,
        max_idle_secs: 10,
    });
    l.insert(k(1), 1, 0, 0);
    assert_eq!(l.insert(k(2), 1, 50, 50), vec![k(1)]);
}

#[test]
fn eviction_order_survives_passes_over_the_slabs() {
    // Two candidates at a time: most evictions need a pass, and inserts older than the
    // candidates' bound must join them.
    let mut l = Lru::with_candidates(
        Policy {
            max_bytes: 10,
            max_idle_secs: 1000 * DAY,
        },
        2,
    );
    let times = [50, 10, 40, 20, 30, 60, 5, 45, 15, 35];
    for (i, t) in times.iter().enumerate() {
        assert!(l.insert(k(*t), 1, *t as u64, 100).is_empty(), "{i}");
    }
    // Touch 10 and 20: they become the newest.
    l.touch(&k(10), 200);
    l.touch(&k(20), 201);
    let mut order = Vec::new();
    for n in 0..10 {
        order.extend(l.insert(nar(n), 1, 300 + u64::from(n), 300 + u64::from(n)));
    }
    let want: Vec<Key> = [5, 15, 30, 35, 40, 45, 50, 60, 10, 20]
        .into_iter()
        .map(k)
        .collect();
    assert_eq!(order, want);
}

/// A xorshift generator: the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn agrees_with_a_naive_model_over_random_operations() {
    // The model: a list of (key, size, last use, order of use); eviction takes the smallest
    // (last use, order of use). Times are coarse, so many uses share a second.
    let policy = Policy {
        max_bytes: 400,
        max_idle_secs: 500,
    };
    for candidates in [1, 3, 64] {
        let mut l = Lru::with_candidates(policy, candidates);
        let mut model: Vec<(Key, u64, u64, u64)> = Vec::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ candidates as u64);
        for step in 0..8000u64 {
            let now = 1000 + step / 3;
            let key = if rng.next(2) == 0 {
                k(rng.next(60) as u32)
            } else {
                nar(rng.next(60) as u32)
            };
            let expired = |m: &(Key, u64, u64, u64)| now - m.2 > policy.max_idle_secs;
            match rng.next(4) {
                0 | 1 => {
                    let size = rng.next(60);
                    // Some inserts carry an older time, as the rebuild's do.
                    let at = now - rng.next(4) * rng.next(300);
                    let mut got = l.insert(key, size, at, now);
                    model.retain(|m| m.0 != key);
                    model.push((key, size, at, step));
                    model.sort_by_key(|m| (m.2, m.3));
                    let mut want: Vec<Key> = Vec::new();
                    while model.first().is_some_and(expired) {
                        want.push(model.remove(0).0);
                    }
                    while model.iter().map(|m| m.1).sum::<u64>() > policy.max_bytes {
                        want.push(model.remove(0).0);
                    }
                    got.sort_by_key(|k| format!("{k:?}"));
                    want.sort_by_key(|k| format!("{k:?}"));
                    assert_eq!(got, want, "insert at step {step}");
                }
                2 => {
                    let want = match model.iter().position(|m| m.0 == key) {
                        None => Touch::Absent,
                        Some(i) if expired(&model[i]) => {
                            model.remove(i);
                            Touch::Expired
                        }
                        Some(i) => {
                            model[i].2 = model[i].2.max(now);
                            model[i].3 = step;
                            Touch::Hit
                        }
                    };
                    assert_eq!(l.touch(&key, now), want, "touch at step {step}");
                }
                _ => {
                    let present = model.iter().any(|m| m.0 == key);
                    model.retain(|m| m.0 != key);
                    assert_eq!(l.remove(&key), present, "remove at step {step}");
                }
            }
            l.check();
            assert_eq!(l.len(), model.len());
            assert_eq!(l.total_bytes(), model.iter().map(|m| m.1).sum::<u64>());
            for m in &model {
                assert_eq!(l.last_use(&m.0), Some(m.2));
            }
        }
    }
}

#[test]
fn a_narinfo_costs_under_40_bytes() {
    let mut l = lru(u64::MAX);
    let n = 200_000u32;
    for i in 0..n {
        l.insert(k(i), 1000, u64::from(i), u64::from(n));
    }
    let per = l.memory_bytes() as f64 / f64::from(n);
    assert!(per < 40.0, "{per:.1} bytes per narinfo");
    let mut l = lru(u64::MAX);
    for i in 0..n {
        l.insert(nar(i), 1000, u64::from(i), u64::from(n));
    }
    let per = l.memory_bytes() as f64 / f64::from(n);
    assert!(per < 52.0, "{per:.1} bytes per NAR");
}
