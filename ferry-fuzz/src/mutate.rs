//! A deterministic mutator: byte flips, inserts, deletes, duplications, splices between
//! inputs, interesting integers (as wire length prefixes and as decimal text) and dictionary
//! tokens (raw and as wire strings). No coverage feedback: the seeds (real files Nix wrote)
//! carry the structure, the mutations stack up to eight deep.

/// SplitMix64: small, fast and fully determined by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; 0 gives 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Integers that make length prefixes, counts and sizes interesting.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    9,
    16,
    31,
    32,
    33,
    64,
    127,
    128,
    255,
    256,
    4095,
    4096,
    4097,
    65535,
    65536,
    1 << 20,
    (1 << 20) + 1,
    1 << 24,
    1 << 28,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 7,
    u64::MAX - 1,
    u64::MAX,
];

/// Bytes that separate or quote things in the formats fuzzed here.
const SPECIAL: &[u8] = b"\0\n\r\t ;:#@=,()[]\"\\/.%?&-+*'{}$\x7f\xff\xc3\xa9";

/// Mutates `data` in place with 1 to 8 stacked mutations; `others` are splice partners,
/// `dict` tokens of the format; the result is at most `max_len` bytes.
pub fn mutate(
    rng: &mut Rng,
    data: &mut Vec<u8>,
    others: &[Vec<u8>],
    dict: &[&[u8]],
    max_len: usize,
) {
    let n = 1 + rng.below(8);
    for _ in 0..n {
        mutate_once(rng, data, others, dict);
    }
    data.truncate(max_len);
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, others: &[Vec<u8>], dict: &[&[u8]]) {
    let len = data.len();
    match rng.below(16) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Set a byte to a random or special value.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = if rng.chance(2) {
                rng.next_u64() as u8
            } else {
                SPECIAL[rng.below(SPECIAL.len())]
            };
        }
        // Insert a few bytes.
        2 => {
            let at = rng.below(len + 1);
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let b = if rng.chance(2) {
                    rng.next_u64() as u8
                } else {
                    SPECIAL[rng.below(SPECIAL.len())]
                };
                data.insert(at, b);
            }
        }
        // Delete a range.
        3 | 4 if len > 0 => {
            let at = rng.below(len);
            let span = if rng.chance(4) { 4096 } else { 16 };
            let k = 1 + rng.below((len - at).min(span));
            data.drain(at..at + k);
        }
        // Overwrite 8 aligned bytes with an interesting little-endian integer (a wire length,
        // count or tag), or with its neighbour.
        5 | 6 if len >= 8 => {
            let at = rng.below(len / 8) * 8;
            let mut v = INTERESTING[rng.below(INTERESTING.len())];
            if rng.chance(4) {
                v = v.wrapping_add(rng.below(3) as u64).wrapping_sub(1);
            }
            data[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        // Add or subtract a little from an aligned wire integer.
        7 if len >= 8 => {
            let at = rng.below(len / 8) * 8;
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            let v = u64::from_le_bytes(b);
            let d = 1 + rng.below(16) as u64;
            let v = if rng.chance(2) {
                v.wrapping_add(d)
            } else {
                v.wrapping_sub(d)
            };
            data[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        // Replace a run of ASCII digits with an interesting number as text.
        8 if len > 0 => {
            let start = rng.below(len);
            if let Some(off) = data[start..].iter().position(u8::is_ascii_digit) {
                let a = start + off;
                let e = a + data[a..].iter().take_while(|b| b.is_ascii_digit()).count();
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let text = match rng.below(4) {
                    0 => format!("-{v}"),
                    1 => format!("{v}0"),
                    _ => v.to_string(),
                };
                data.splice(a..e, text.into_bytes());
            }
        }
        // Insert a dictionary token, raw or as a wire string.
        9 | 10 if !dict.is_empty() => {
            let tok = dict[rng.below(dict.len())];
            let at = if rng.chance(2) {
                rng.below(len / 8 + 1) * 8
            } else {
                rng.below(len + 1)
            };
            let bytes = if rng.chance(2) {
                wire_string(tok)
            } else {
                tok.to_vec()
            };
            data.splice(at..at, bytes);
        }
        // Duplicate a range (repeats entries, lines, nesting).
        11 if len > 0 => {
            let a = rng.below(len);
            let k = 1 + rng.below((len - a).min(256));
            let chunk = data[a..a + k].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        // Splice: our head with the tail of another input, or a piece of it inserted.
        12 | 13 if !others.is_empty() => {
            let other = &others[rng.below(others.len())];
            if other.is_empty() {
                return;
            }
            if rng.chance(2) {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            } else {
                let a = rng.below(other.len());
                let k = 1 + rng.below((other.len() - a).min(512));
                let at = rng.below(len + 1);
                data.splice(at..at, other[a..a + k].iter().copied());
            }
        }
        // Truncate.
        14 if len > 0 => data.truncate(rng.below(len)),
        // Swap two bytes.
        _ if len > 1 => {
            let (i, j) = (rng.below(len), rng.below(len));
            data.swap(i, j);
        }
        _ => data.push(rng.next_u64() as u8),
    }
}

/// `tok` as Nix's wire protocol writes a string: length, bytes, zero padding to 8.
pub fn wire_string(tok: &[u8]) -> Vec<u8> {
    let mut v = (tok.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(tok);
    v.resize(v.len() + (8 - tok.len() % 8) % 8, 0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_mutations() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut d = b"hello world, a seed".to_vec();
            let others = vec![b"other".to_vec()];
            for _ in 0..1000 {
                mutate(&mut rng, &mut d, &others, &[b"tok"], 4096);
            }
            d
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn wire_strings_are_padded() {
        assert_eq!(wire_string(b"abc").len(), 16);
        assert_eq!(wire_string(b"").len(), 8);
        assert_eq!(wire_string(b"12345678").len(), 16);
    }
}
