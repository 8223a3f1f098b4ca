//! The push checker ([`NarChecker`]) held to the pull parser (`nar::validate`): the same
//! verdict, size and error on every NAR the NAR tests use, whatever the slicing.

use ferry_nix::nar::{self, NarChecker, NarReadError};

/// Piece sizes for feeding the checker: a fixed size, or pseudo-random ones (xorshift64).
#[derive(Clone, Copy, Debug)]
pub enum Slicing {
    Fixed(usize),
    /// Sizes from 1 to `max`, from this seed.
    Random {
        seed: u64,
        max: usize,
    },
}

/// Whole, byte by byte, one word at a time, and random pieces both small (every token cut
/// somewhere) and large (file contents cut across the parser's 64 KiB reads).
pub const SLICINGS: [Slicing; 7] = [
    Slicing::Fixed(usize::MAX),
    Slicing::Fixed(1),
    Slicing::Fixed(8),
    Slicing::Fixed(7),
    Slicing::Random { seed: 1, max: 16 },
    Slicing::Random { seed: 7, max: 300 },
    Slicing::Random {
        seed: 42,
        max: 70_000,
    },
];

impl Slicing {
    fn sizes(self) -> impl FnMut() -> usize {
        let mut state = match self {
            Slicing::Fixed(_) => 0,
            Slicing::Random { seed, .. } => seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        };
        move || match self {
            Slicing::Fixed(n) => n,
            Slicing::Random { max, .. } => {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                1 + (state % max as u64) as usize
            }
        }
    }
}

/// `nar::validate` done with the checker: `bytes` fed in pieces, and bytes it does not take
/// are trailing data.
pub fn validate_pushed(bytes: &[u8], slicing: Slicing) -> Result<u64, NarReadError> {
    let mut sizes = slicing.sizes();
    let mut checker = NarChecker::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(sizes().clamp(1, rest.len()));
        let used = checker.feed(piece)?;
        if used < piece.len() {
            assert!(
                checker.is_done(),
                "{slicing:?}: took {used} of {}",
                piece.len()
            );
            return Err(NarReadError::TrailingData {
                offset: checker.offset(),
            });
        }
        rest = after;
    }
    checker.finish()
}

/// Validates `bytes` with the pull parser and with the checker in every slicing, asserts they
/// agree (the same size, or the same error: variant, offset and message), and returns the
/// pull parser's verdict.
pub fn validate_both(bytes: &[u8]) -> Result<u64, NarReadError> {
    let pulled = nar::validate(bytes);
    for slicing in SLICINGS {
        let pushed = validate_pushed(bytes, slicing);
        match (&pulled, &pushed) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{slicing:?}"),
            (Err(a), Err(b)) => {
                assert_eq!(
                    std::mem::discriminant(a),
                    std::mem::discriminant(b),
                    "{slicing:?}: {a} / {b}"
                );
                assert_eq!(a.offset(), b.offset(), "{slicing:?}: {a} / {b}");
                assert_eq!(a.to_string(), b.to_string(), "{slicing:?}");
            }
            (a, b) => panic!("{slicing:?}: pull {a:?}, push {b:?}"),
        }
    }
    pulled
}
