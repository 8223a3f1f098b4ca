//! Ed25519 signing keys and signatures in Nix's text form, `<name>:<base64>`.
//!
//! Follows `src/libstore/crypto.cc` (Nix 2.8; `src/libutil/signature/local-keys.cc` in later
//! versions): a secret key is libsodium's 64 bytes (32-byte seed ‖ 32-byte public key), a public
//! key 32 bytes, a signature 64 bytes, each prefixed by the key name and a colon. Signatures are
//! libsodium's `crypto_sign_detached`, which is plain Ed25519 and deterministic, so
//! `ed25519-dalek` produces byte-identical `Sig:` values.
//!
//! Errors never contain key material: they name the key (when its name was readable), the
//! problem and, for files, the path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer as _;
use thiserror::Error;

/// Length of a secret key: seed and public key, as libsodium stores it.
pub const SECRET_KEY_LEN: usize = 64;
/// Length of a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SigningError {
    #[error("{what} has no ':' between the key name and the base-64 data")]
    MissingColon { what: &'static str },
    #[error("{what} has an empty key name before the ':'")]
    EmptyName { what: &'static str },
    #[error("{what} '{name}' has no base-64 data after the ':'")]
    EmptyData { what: &'static str, name: String },
    #[error("{what} '{name}' has the invalid base-64 character {ch:?} at byte offset {offset}")]
    BadBase64 {
        what: &'static str,
        name: String,
        ch: char,
        offset: usize,
    },
    #[error("{what} '{name}' decodes to {got} bytes, want {want}")]
    WrongLength {
        what: &'static str,
        name: String,
        got: usize,
        want: usize,
    },
    #[error("secret key '{name}' is corrupt: its second half is not the public key of its seed")]
    MismatchedPublicHalf { name: String },
    #[error("public key '{name}' is not a valid Ed25519 point")]
    InvalidPublicKey { name: String },
    #[error(
        "key name {name:?} is not usable: it must be non-empty and contain no ':' or whitespace"
    )]
    BadKeyName { name: String },
    #[error("cannot read key file '{}': {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file '{}': {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<SigningError>,
    },
    #[error("cannot get random bytes for a new key: {0}")]
    Random(String),
}

/// Splits `<name>:<data>` at the first ':' as `split()` in `crypto.cc` does, after trimming
/// surrounding whitespace (Nix reads key files without trimming, but its base-64 decoder skips
/// the newline a hand-edited file tends to end with; trimming covers that and stray spaces).
fn split_key_text<'a>(
    what: &'static str,
    text: &'a str,
) -> Result<(&'a str, &'a str, usize), SigningError> {
    let trimmed = text.trim();
    let colon = trimmed
        .find(':')
        .ok_or(SigningError::MissingColon { what })?;
    let (name, data) = (&trimmed[..colon], &trimmed[colon + 1..]);
    if name.is_empty() {
        return Err(SigningError::EmptyName { what });
    }
    if data.is_empty() {
        return Err(SigningError::EmptyData {
            what,
            name: name.to_owned(),
        });
    }
    // Offset of the data within the original text, for error positions.
    let lead = text.len() - text.trim_start().len();
    Ok((name, data, lead + colon + 1))
}

/// Decodes base-64 the way Nix's `base64Decode` (`src/libutil/util.cc`) does: newlines are
/// skipped, decoding stops at the first '=' and missing padding is fine. Unlike Nix, anything
/// but '=' and whitespace after the first '=' is an error rather than silently ignored.
/// `base_offset` positions reported errors in the caller's text.
fn decode_lenient_base64(
    what: &'static str,
    name: &str,
    data: &str,
    base_offset: usize,
) -> Result<Vec<u8>, SigningError> {
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padding = false;
    for (i, ch) in data.char_indices() {
        let bad = || SigningError::BadBase64 {
            what,
            name: name.to_owned(),
            ch,
            offset: base_offset + i,
        };
        if ch == '\n' || ch == '\r' {
            continue;
        }
        if ch == '=' {
            padding = true;
            continue;
        }
        if padding {
            return Err(bad());
        }
        let digit = match ch {
            'A'..='Z' => ch as u32 - 'A' as u32,
            'a'..='z' => ch as u32 - 'a' as u32 + 26,
            '0'..='9' => ch as u32 - '0' as u32 + 52,
            '+' => 62,
            '/' => 63,
            _ => return Err(bad()),
        };
        acc = (acc << 6) | digit;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

fn decode_fixed<const N: usize>(
    what: &'static str,
    text: &str,
) -> Result<(String, [u8; N]), SigningError> {
    let (name, data, offset) = split_key_text(what, text)?;
    let bytes = decode_lenient_base64(what, name, data, offset)?;
    let arr: [u8; N] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| SigningError::WrongLength {
            what,
            name: name.to_owned(),
            got: bytes.len(),
            want: N,
        })?;
    Ok((name.to_owned(), arr))
}

fn read_key_file<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, SigningError>,
) -> Result<T, SigningError> {
    let text = std::fs::read_to_string(path).map_err(|source| SigningError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|e| SigningError::InFile {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// A key name Ferry can write into a key file and a `Sig:` line.
fn check_key_name(name: &str) -> Result<(), SigningError> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(SigningError::BadKeyName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// A detached signature, `<key name>:<base64 of 64 bytes>` (a narinfo `Sig:` value).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: String,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    pub fn new(key_name: &str, bytes: [u8; SIGNATURE_LEN]) -> Result<Self, SigningError> {
        check_key_name(key_name)?;
        Ok(Signature {
            key_name: key_name.to_owned(),
            bytes,
        })
    }

    /// Parses `<name>:<base64>` as Nix's `Signature::parse` does (current Nix; 2.8 kept the
    /// string and failed only when verifying with a known key): the name must be non-empty and
    /// the data exactly 64 bytes.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let (key_name, bytes) = decode_fixed::<SIGNATURE_LEN>("signature", text)?;
        Ok(Signature { key_name, bytes })
    }

    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    pub fn bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.key_name, B64.encode(self.bytes))
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl std::str::FromStr for Signature {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Signature::parse(s)
    }
}

/// Ordered by the rendered text, because Nix keeps signatures in a `std::set<std::string>` and
/// writes `Sig:` lines in that order. (Byte order of "name:base64" differs from comparing the
/// name and then the raw bytes.)
impl Ord for Signature {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.to_string().cmp(&other.to_string())
    }
}

impl PartialOrd for Signature {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// An Ed25519 secret key with its name. `Debug` shows only the name and the public key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({}, public {})", self.name, self.to_public())
    }
}

impl SecretKey {
    /// Parses the contents of a Nix secret key file, `<name>:<base64 of seed ‖ public key>`.
    /// The public half must belong to the seed: libsodium would sign with a mismatched half
    /// and produce signatures nobody can verify.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let (name, bytes) = decode_fixed::<SECRET_KEY_LEN>("secret key", text)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SigningError::MismatchedPublicHalf { name: name.clone() })?;
        Ok(SecretKey { name, key })
    }

    /// Reads and parses a secret key file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, SigningError> {
        read_key_file(path, Self::parse)
    }

    /// A key from a 32-byte seed (what libsodium derives the key pair from).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, SigningError> {
        check_key_name(name)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// A new random key, like `nix-store --generate-binary-cache-key` / `nix key
    /// generate-secret`, seeded from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self, SigningError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| SigningError::Random(e.to_string()))?;
        let key = Self::from_seed(name, seed);
        seed.fill(0);
        key
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The key file contents as Nix writes them: `<name>:<base64>`, no trailing newline.
    pub fn to_key_file_text(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }

    /// Signs `message` (for a store path, its fingerprint).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }
}

/// An Ed25519 public key with its name, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// Parses `<name>:<base64 of 32 bytes>`. Unlike Nix, which would only fail to verify, a
    /// value that is not a curve point is rejected here.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let (name, bytes) = decode_fixed::<PUBLIC_KEY_LEN>("public key", text)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SigningError::InvalidPublicKey { name: name.clone() })?;
        Ok(PublicKey { name, key })
    }

    /// Reads and parses a public key file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, SigningError> {
        read_key_file(path, Self::parse)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.key.as_bytes()
    }

    /// True if `sig` was made by this key over `message`: the key names must match (Nix looks
    /// keys up by the signature's name) and the signature must pass strict verification
    /// (canonical encodings, no small-order points; libsodium is as strict).
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        if sig.key_name != self.name {
            return false;
        }
        let s = ed25519_dalek::Signature::from_bytes(&sig.bytes);
        self.key.verify_strict(message, &s).is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    /// `<name>:<base64>`, as `nix key convert-secret-to-public` prints it (Nix's `.pub` files
    /// have no trailing newline).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PublicKey::parse(s)
    }
}

/// A set of trusted public keys by name, Nix's `PublicKeys` (`std::map<std::string,
/// PublicKey>`): a signature is looked up by its key name only.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl TrustedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a whitespace-separated list, the value of `trusted-public-keys`.
    pub fn parse_list(list: &str) -> Result<Self, SigningError> {
        let mut keys = Self::new();
        for word in list.split_whitespace() {
            keys.insert(PublicKey::parse(word)?);
        }
        Ok(keys)
    }

    /// Adds a key; like `std::map::emplace` in `getDefaultPublicKeys`, a second key with the
    /// same name is ignored. Returns whether the key was added.
    pub fn insert(&mut self, key: PublicKey) -> bool {
        if self.keys.contains_key(&key.name) {
            return false;
        }
        self.keys.insert(key.name.clone(), key);
        true
    }

    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `verifyDetached`: false when no trusted key has the signature's name.
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        self.keys
            .get(&sig.key_name)
            .is_some_and(|k| k.verify(message, sig))
    }

    /// How many of `sigs` verify (`ValidPathInfo::checkSignatures`, without its CA shortcut).
    pub fn count_valid<'a>(
        &self,
        message: &[u8],
        sigs: impl IntoIterator<Item = &'a Signature>,
    ) -> usize {
        sigs.into_iter().filter(|s| self.verify(message, s)).count()
    }

    /// Whether a path with these signatures is trusted: any signature by a trusted key verifies.
    pub fn any_valid<'a>(
        &self,
        message: &[u8],
        sigs: impl IntoIterator<Item = &'a Signature>,
    ) -> bool {
        sigs.into_iter().any(|s| self.verify(message, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7u8; 32];

    #[test]
    fn secret_key_round_trips_and_signs() {
        let sk = SecretKey::from_seed("test-1", SEED).expect("key");
        let text = sk.to_key_file_text();
        assert!(text.starts_with("test-1:") && !text.ends_with('\n'));
        let again = SecretKey::parse(&format!("{text}\n")).expect("trailing newline");
        assert_eq!(again.to_key_file_text(), text);
        let pk = sk.to_public();
        assert_eq!(PublicKey::parse(&pk.to_string()).expect("pub"), pk);
        let sig = sk.sign(b"fingerprint");
        assert_eq!(Signature::parse(&sig.to_string()).expect("sig"), sig);
        assert!(pk.verify(b"fingerprint", &sig));
        assert!(!pk.verify(b"fingerprint2", &sig));
    }

    #[test]
    fn missing_padding_and_embedded_newlines_are_accepted() {
        let sk = SecretKey::from_seed("k", SEED).expect("key");
        let text = sk.to_key_file_text();
        let unpadded = text.trim_end_matches('=');
        assert_ne!(unpadded, text);
        assert!(SecretKey::parse(unpadded).is_ok());
        let (a, b) = text.split_at(20);
        assert!(SecretKey::parse(&format!("  {a}\n{b}  \n")).is_ok());
    }

    #[test]
    fn generate_makes_distinct_keys() {
        let a = SecretKey::generate("gen").expect("a");
        let b = SecretKey::generate("gen").expect("b");
        assert_ne!(a.to_public(), b.to_public());
        assert!(SecretKey::generate("bad name").is_err());
        assert!(SecretKey::generate("").is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = PublicKey::parse("nocolon").expect_err("must fail");
        assert!(
            matches!(e, SigningError::MissingColon { what: "public key" }),
            "{e}"
        );
        let e = PublicKey::parse(":AAAA").expect_err("must fail");
        assert!(matches!(e, SigningError::EmptyName { .. }), "{e}");
        let e = PublicKey::parse("k:").expect_err("must fail");
        assert!(matches!(e, SigningError::EmptyData { .. }), "{e}");
        let e = PublicKey::parse("k:AA*A").expect_err("must fail");
        assert!(
            matches!(
                e,
                SigningError::BadBase64 {
                    ch: '*',
                    offset: 4,
                    ..
                }
            ),
            "{e}"
        );
        let e = PublicKey::parse("k:AAAA").expect_err("must fail");
        assert!(e.to_string().contains("3 bytes, want 32"), "{e}");
        let e = Signature::parse("k:AA==AA").expect_err("must fail");
        assert!(
            matches!(
                e,
                SigningError::BadBase64 {
                    ch: 'A',
                    offset: 6,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn signature_order_is_text_order() {
        // "a-b:" sorts before "a:" as text although "a" < "a-b" as names.
        let x = Signature::new("a", [0; 64]).expect("x");
        let y = Signature::new("a-b", [0; 64]).expect("y");
        assert!(y < x);
    }

    #[test]
    fn trusted_keys_first_name_wins() {
        let a = SecretKey::from_seed("same", [1; 32]).expect("a");
        let b = SecretKey::from_seed("same", [2; 32]).expect("b");
        let mut t = TrustedKeys::new();
        assert!(t.insert(a.to_public()));
        assert!(!t.insert(b.to_public()));
        assert!(t.verify(b"m", &a.sign(b"m")));
        assert!(!t.verify(b"m", &b.sign(b"m")));
    }
}
