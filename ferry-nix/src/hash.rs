//! Hashes as Nix prints and parses them: base-16, Nix base-32, base-64 and SRI.
//!
//! Follows `src/libutil/hash.cc` (`Hash::parseAnyPrefixed`, `Hash::to_string`) and
//! `src/libutil/base-nix-32.cc` (the bit order of Nix's base-32), Nix 2.8 to current.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Digest as _;
use thiserror::Error;

/// The hash algorithms Ferry needs (NAR and file hashes are SHA-256; SHA-512 appears in
/// fixed-output derivations and SRI strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    pub fn size(self) -> usize {
        match self {
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    pub fn from_name(name: &str) -> Result<Self, HashError> {
        match name {
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            other => Err(HashError::UnknownAlgo(other.to_owned())),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}' (Ferry supports sha256 and sha512)")]
    UnknownAlgo(String),
    #[error("hash '{0}' has no algorithm prefix (expected 'sha256:...' or SRI 'sha256-...')")]
    MissingPrefix(String),
    #[error(
        "hash '{input}' has length {len}, which is not a {algo} hash in base-16 ({b16}), Nix base-32 ({b32}) or base-64 ({b64})"
    )]
    BadLength {
        input: String,
        algo: &'static str,
        len: usize,
        b16: usize,
        b32: usize,
        b64: usize,
    },
    #[error("invalid {encoding} character {ch:?} at offset {offset} in hash '{input}'")]
    BadChar {
        input: String,
        encoding: &'static str,
        ch: char,
        offset: usize,
    },
    #[error("invalid Nix base-32 hash '{0}': the value does not fit in the hash size")]
    Nix32Overflow(String),
    #[error("invalid base-64 in hash '{input}': {reason}")]
    BadBase64 { input: String, reason: String },
    #[error("SRI hash '{input}' decodes to {got} bytes, {algo} needs {want}")]
    SriSize {
        input: String,
        algo: &'static str,
        got: usize,
        want: usize,
    },
}

/// A hash value together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Hash {
    algo: HashAlgo,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash({})", self.to_nix32_prefixed())
    }
}

impl std::fmt::Display for Hash {
    /// Nix's default for narinfo and fingerprints: `sha256:<nix32>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_nix32_prefixed())
    }
}

/// Nix's base-32 alphabet: digits and letters without e, o, u and t.
const NIX32_CHARS: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the Nix base-32 form of `n` bytes.
pub fn nix32_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes bytes in Nix base-32. The last character holds the lowest bits of byte 0
/// (`printHash32`: it walks from the most significant 5-bit group down).
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = nix32_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let mut c = bytes[i] >> j;
        if i + 1 < bytes.len() {
            // The shift is done in u16 so `8 - j == 8` drops the byte instead of overflowing.
            c |= ((bytes[i + 1] as u16) << (8 - j)) as u8;
        }
        out.push(NIX32_CHARS[(c & 0x1f) as usize] as char);
    }
    out
}

/// Decodes Nix base-32 into exactly `size` bytes; `input` must have `nix32_len(size)` chars.
pub fn nix32_decode(input: &str, size: usize) -> Result<Vec<u8>, HashError> {
    let s = input.as_bytes();
    if s.len() != nix32_len(size) {
        return Err(HashError::BadLength {
            input: input.to_owned(),
            algo: "given-size",
            len: s.len(),
            b16: size * 2,
            b32: nix32_len(size),
            b64: base64_len(size),
        });
    }
    let mut out = vec![0u8; size];
    for (k, &ch) in s.iter().enumerate() {
        let digit = NIX32_CHARS
            .iter()
            .position(|&c| c == ch)
            .ok_or_else(|| HashError::BadChar {
                input: input.to_owned(),
                encoding: "Nix base-32",
                ch: ch as char,
                offset: k,
            })? as u16;
        let n = s.len() - 1 - k;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = (digit << j) >> 8;
        if i + 1 < size {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(HashError::Nix32Overflow(input.to_owned()));
        }
    }
    Ok(out)
}

fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

fn hex_decode(input: &str, whole: &str) -> Result<Vec<u8>, HashError> {
    let digit = |k: usize, c: u8| -> Result<u8, HashError> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| HashError::BadChar {
                input: whole.to_owned(),
                encoding: "base-16",
                ch: c as char,
                offset: k,
            })
    };
    let b = input.as_bytes();
    (0..b.len() / 2)
        .map(|i| Ok(digit(2 * i, b[2 * i])? << 4 | digit(2 * i + 1, b[2 * i + 1])?))
        .collect()
}

impl Hash {
    pub fn new(algo: HashAlgo, bytes: Vec<u8>) -> Result<Self, HashError> {
        if bytes.len() != algo.size() {
            return Err(HashError::SriSize {
                input: String::from("<raw bytes>"),
                algo: algo.name(),
                got: bytes.len(),
                want: algo.size(),
            });
        }
        Ok(Hash { algo, bytes })
    }

    pub fn sha256_bytes(bytes: [u8; 32]) -> Self {
        Hash {
            algo: HashAlgo::Sha256,
            bytes: bytes.to_vec(),
        }
    }

    /// The hash of `data` with `algo`.
    pub fn of(algo: HashAlgo, data: &[u8]) -> Self {
        let bytes = match algo {
            HashAlgo::Sha256 => sha2::Sha256::digest(data).to_vec(),
            HashAlgo::Sha512 => sha2::Sha512::digest(data).to_vec(),
        };
        Hash { algo, bytes }
    }

    /// SHA-256 of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Self::sha256_bytes(sha2::Sha256::digest(data).into())
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Parses `<algo>:<base16|nix32|base64>` or SRI `<algo>-<base64>`, as
    /// `Hash::parseAnyPrefixed` does (narinfo `NarHash`/`FileHash`, `nix hash` output).
    pub fn parse_any_prefixed(input: &str) -> Result<Self, HashError> {
        if let Some((algo, rest)) = input.split_once(':') {
            let algo = HashAlgo::from_name(algo)?;
            return Self::parse_unprefixed(rest, algo, input);
        }
        if let Some((algo, rest)) = input.split_once('-') {
            let algo = HashAlgo::from_name(algo)?;
            return Self::parse_sri_body(rest, algo, input);
        }
        Err(HashError::MissingPrefix(input.to_owned()))
    }

    /// Parses a hash without prefix whose algorithm is known from context
    /// (the worker protocol's base-16 `narHash`, for instance): the encoding is told by length.
    pub fn parse_non_sri_unprefixed(input: &str, algo: HashAlgo) -> Result<Self, HashError> {
        Self::parse_unprefixed(input, algo, input)
    }

    fn parse_unprefixed(rest: &str, algo: HashAlgo, whole: &str) -> Result<Self, HashError> {
        let size = algo.size();
        let bytes = if rest.len() == size * 2 {
            hex_decode(rest, whole)?
        } else if rest.len() == nix32_len(size) {
            nix32_decode(rest, size).map_err(|e| match e {
                HashError::BadChar {
                    encoding,
                    ch,
                    offset,
                    ..
                } => HashError::BadChar {
                    input: whole.to_owned(),
                    encoding,
                    ch,
                    offset: offset + (whole.len() - rest.len()),
                },
                HashError::Nix32Overflow(_) => HashError::Nix32Overflow(whole.to_owned()),
                other => other,
            })?
        } else if rest.len() == base64_len(size) {
            B64.decode(rest).map_err(|e| HashError::BadBase64 {
                input: whole.to_owned(),
                reason: e.to_string(),
            })?
        } else {
            return Err(HashError::BadLength {
                input: whole.to_owned(),
                algo: algo.name(),
                len: rest.len(),
                b16: size * 2,
                b32: nix32_len(size),
                b64: base64_len(size),
            });
        };
        if bytes.len() != size {
            return Err(HashError::SriSize {
                input: whole.to_owned(),
                algo: algo.name(),
                got: bytes.len(),
                want: size,
            });
        }
        Ok(Hash { algo, bytes })
    }

    fn parse_sri_body(rest: &str, algo: HashAlgo, whole: &str) -> Result<Self, HashError> {
        let bytes = B64.decode(rest).map_err(|e| HashError::BadBase64 {
            input: whole.to_owned(),
            reason: e.to_string(),
        })?;
        if bytes.len() != algo.size() {
            return Err(HashError::SriSize {
                input: whole.to_owned(),
                algo: algo.name(),
                got: bytes.len(),
                want: algo.size(),
            });
        }
        Ok(Hash { algo, bytes })
    }

    /// `sha256:<nix32>`: narinfo fields and signature fingerprints.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("{}:{}", self.algo.name(), nix32_encode(&self.bytes))
    }

    pub fn to_nix32(&self) -> String {
        nix32_encode(&self.bytes)
    }

    /// Lower-case base-16 without prefix: the worker protocol's `narHash`.
    pub fn to_base16(&self) -> String {
        self.bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn to_base64(&self) -> String {
        B64.encode(&self.bytes)
    }

    /// `sha256-<base64>`: `nix path-info --json` and `nix hash --sri`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo.name(), self.to_base64())
    }
}

/// An incremental SHA-256, for hashing NARs while they stream.
#[derive(Default, Clone)]
pub struct Sha256Sink {
    inner: sha2::Sha256,
    len: u64,
}

impl Sha256Sink {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }
    /// Bytes seen so far (the NAR size when hashing a NAR).
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Hash {
        Hash::sha256_bytes(self.inner.finalize().into())
    }
}

impl std::io::Write for Sha256Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An incremental hash of either algorithm, for checking a NAR against the hash its sender
/// declared while it streams (a builder may declare SHA-512).
#[derive(Clone)]
pub struct HashSink {
    state: HashState,
    len: u64,
}

#[derive(Clone)]
enum HashState {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl HashSink {
    pub fn new(algo: HashAlgo) -> Self {
        let state = match algo {
            HashAlgo::Sha256 => HashState::Sha256(sha2::Sha256::default()),
            HashAlgo::Sha512 => HashState::Sha512(sha2::Sha512::default()),
        };
        HashSink { state, len: 0 }
    }
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.state {
            HashState::Sha256(h) => h.update(data),
            HashState::Sha512(h) => h.update(data),
        }
        self.len += data.len() as u64;
    }
    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Hash {
        match self.state {
            HashState::Sha256(h) => Hash::sha256_bytes(h.finalize().into()),
            HashState::Sha512(h) => Hash {
                algo: HashAlgo::Sha512,
                bytes: h.finalize().to_vec(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An arbitrary digest; the golden tests in tests/ check the encodings against real Nix.
    const HEX: &str = "1d0495fcf817ac1ebca9b8fd5a5d0d4d2a8cb6de2c7e2d1c7f7f1b0e7e8c3d6a";

    #[test]
    fn hash_sink_in_pieces_is_the_hash_of_the_whole() {
        for algo in [HashAlgo::Sha256, HashAlgo::Sha512] {
            let mut h = HashSink::new(algo);
            h.update(b"hello ");
            h.update(b"world");
            assert_eq!(h.len(), 11);
            assert_eq!(h.finish(), Hash::of(algo, b"hello world"));
        }
    }

    #[test]
    fn nix32_known_vector() {
        // sha256("") in Nix base-32, as `nix hash to-base32 sha256:e3b0c442...` prints it.
        let h = Hash::sha256_of(b"");
        assert_eq!(
            h.to_nix32(),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            h.to_base16(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn all_encodings_round_trip() {
        let h = Hash::parse_non_sri_unprefixed(HEX, HashAlgo::Sha256).expect("hex");
        for s in [
            h.to_nix32_prefixed(),
            format!("sha256:{}", h.to_base16()),
            format!("sha256:{}", h.to_base64()),
            h.to_sri(),
        ] {
            assert_eq!(Hash::parse_any_prefixed(&s).expect(&s), h, "{s}");
        }
        let d = nix32_decode(&h.to_nix32(), 32).expect("nix32");
        assert_eq!(d, h.bytes());
    }

    #[test]
    fn nix32_round_trips_all_sizes() {
        for n in [1usize, 5, 16, 20, 32, 64] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(
                nix32_decode(&nix32_encode(&bytes), n).expect("decode"),
                bytes
            );
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Hash::parse_any_prefixed("md4:abcd").unwrap_err();
        assert_eq!(e, HashError::UnknownAlgo("md4".into()));
        assert!(e.to_string().contains("md4"));

        let e = Hash::parse_any_prefixed("abcdef").unwrap_err();
        assert!(matches!(e, HashError::MissingPrefix(_)));

        let e = Hash::parse_any_prefixed("sha256:abc").unwrap_err();
        assert!(e.to_string().contains("length 3"), "{e}");

        // 'e' is not in Nix's base-32 alphabet; the offset counts from the start of the input.
        let mut bad = Hash::sha256_of(b"").to_nix32_prefixed();
        bad.replace_range(10..11, "e");
        let e = Hash::parse_any_prefixed(&bad).unwrap_err();
        assert!(
            matches!(
                e,
                HashError::BadChar {
                    ch: 'e',
                    offset: 10,
                    ..
                }
            ),
            "{e:?}"
        );

        let e = Hash::parse_any_prefixed(&format!("sha256:{}", "g".repeat(64))).unwrap_err();
        assert!(matches!(e, HashError::BadChar { offset: 0, .. }), "{e:?}");

        let e = Hash::parse_any_prefixed("sha256-AAAA").unwrap_err();
        assert!(matches!(e, HashError::SriSize { got: 3, .. }), "{e:?}");

        // 52 'z' = 260 bits of ones: more than 256 bits.
        let e = Hash::parse_any_prefixed(&format!("sha256:{}", "z".repeat(52))).unwrap_err();
        assert!(matches!(e, HashError::Nix32Overflow(_)), "{e:?}");
    }
}
