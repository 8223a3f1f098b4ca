//! Keys and signatures against files written by Nix 2.8.0 (`golden/regen-narinfo.sh`) and
//! the cache.nixos.org vector of docs/upload.md §3.4.

use std::path::PathBuf;

use ferry_nix::signing::{PublicKey, SecretKey, Signature, SigningError, TrustedKeys};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/narinfo")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(golden(name)).expect("golden file")
}

const NIXOS_FP: &str = "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n";
const NIXOS_SIG: &str = "cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==";
const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

#[test]
fn nix_key_files_parse_and_render_byte_identically() {
    for k in ["ferry-test-1", "ferry-test-2"] {
        let sec_text = read(&format!("{k}.sec"));
        let pub_text = read(&format!("{k}.pub"));
        let sk = SecretKey::from_file(&golden(&format!("{k}.sec"))).expect("secret key");
        let pk = PublicKey::from_file(&golden(&format!("{k}.pub"))).expect("public key");
        assert_eq!(sk.name(), k);
        // Nix writes both files without a trailing newline; so does Ferry.
        assert_eq!(sk.to_key_file_text(), sec_text);
        assert_eq!(pk.to_string(), pub_text);
        assert_eq!(sk.to_public(), pk);
        // A newline added by an editor is tolerated.
        assert_eq!(
            SecretKey::parse(&format!("{sec_text}\n"))
                .expect("newline")
                .to_public(),
            pk
        );
        assert_eq!(
            PublicKey::parse(&format!("{pub_text}\n")).expect("newline"),
            pk
        );
    }
}

#[test]
fn cache_nixos_org_vector_verifies() {
    let pk = PublicKey::parse(NIXOS_KEY).expect("key");
    let sig = Signature::parse(NIXOS_SIG).expect("sig");
    assert_eq!(sig.to_string(), NIXOS_SIG);
    assert!(pk.verify(NIXOS_FP.as_bytes(), &sig));
    assert!(!pk.verify(NIXOS_FP.replace("196040", "196041").as_bytes(), &sig));

    let trusted = TrustedKeys::parse_list(&format!("{} {NIXOS_KEY}\n", read("ferry-test-1.pub")))
        .expect("list");
    assert_eq!(trusted.len(), 2);
    assert!(trusted.any_valid(NIXOS_FP.as_bytes(), [&sig]));
    // The same bytes under another key name are looked up under that name and fail.
    let renamed = Signature::new("ferry-test-1", *sig.bytes()).expect("renamed");
    assert!(!trusted.verify(NIXOS_FP.as_bytes(), &renamed));
    assert_eq!(
        trusted.count_valid(NIXOS_FP.as_bytes(), [&sig, &renamed]),
        1
    );
    let only_test = TrustedKeys::parse_list(&read("ferry-test-1.pub")).expect("list");
    assert!(!only_test.any_valid(NIXOS_FP.as_bytes(), [&sig]));
}

#[test]
fn generated_key_round_trips_through_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sk = SecretKey::generate("ferry-gen-1").expect("generate");
    let path = dir.path().join("key.sec");
    std::fs::write(&path, sk.to_key_file_text()).expect("write");
    let again = SecretKey::from_file(&path).expect("read back");
    assert_eq!(again.to_public(), sk.to_public());
    let sig = sk.sign(b"1;x");
    assert!(again.to_public().verify(b"1;x", &sig));
}

fn secret_bytes_text(name: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "{name}:{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[test]
fn malformed_keys_name_the_problem() {
    let e = SecretKey::parse("no-colon-here").expect_err("must fail");
    assert!(
        matches!(e, SigningError::MissingColon { what: "secret key" }),
        "{e}"
    );
    assert!(e.to_string().contains("no ':'"), "{e}");

    let e = SecretKey::parse(":AAAA").expect_err("must fail");
    assert!(e.to_string().contains("empty key name"), "{e}");

    let e =
        PublicKey::parse("k1:H0O8ORJNjwfquBN3nKrptLUj!iRjoxwQQmfARL9J8Hw=").expect_err("must fail");
    assert!(
        matches!(
            e,
            SigningError::BadBase64 {
                ch: '!',
                offset: 27,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("offset 27") && e.to_string().contains("'k1'"),
        "{e}"
    );

    let e = SecretKey::parse(&read("ferry-test-1.pub")).expect_err("must fail");
    assert!(
        matches!(
            e,
            SigningError::WrongLength {
                got: 32,
                want: 64,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("32 bytes, want 64"), "{e}");
    let e = PublicKey::parse(&read("ferry-test-1.sec")).expect_err("must fail");
    assert!(e.to_string().contains("64 bytes, want 32"), "{e}");

    // Seed of key 1 with the public half of key 2.
    let sk1 = SecretKey::parse(&read("ferry-test-1.sec")).expect("k1");
    let pk2 = PublicKey::parse(&read("ferry-test-2.pub")).expect("k2");
    let text1 = sk1.to_key_file_text();
    use base64::Engine as _;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(text1.split_once(':').expect("colon").1)
        .expect("b64");
    bytes[32..].copy_from_slice(pk2.bytes());
    let e = SecretKey::parse(&secret_bytes_text("ferry-test-1", &bytes)).expect_err("must fail");
    assert!(
        matches!(e, SigningError::MismatchedPublicHalf { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("ferry-test-1"), "{e}");
    // The error does not leak the key material.
    assert!(!e.to_string().contains(&text1[15..30]), "{e}");
}

#[test]
fn key_file_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.sec");
    std::fs::write(&path, "broken:AAAA\n").expect("write");
    let e = SecretKey::from_file(&path).expect_err("must fail");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(matches!(e, SigningError::InFile { .. }), "{e:?}");
    if let SigningError::InFile { source, .. } = &e {
        assert!(matches!(
            **source,
            SigningError::WrongLength {
                got: 3,
                want: 64,
                ..
            }
        ));
    }

    let missing = dir.path().join("missing.pub");
    let e = PublicKey::from_file(&missing).expect_err("must fail");
    assert!(matches!(e, SigningError::ReadFile { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.pub"), "{e}");
}

#[test]
fn malformed_signatures_name_the_problem() {
    let e = Signature::parse("TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB").expect_err("must fail");
    assert!(
        matches!(e, SigningError::MissingColon { what: "signature" }),
        "{e}"
    );
    let e = Signature::parse("cache.nixos.org-1:AAAA").expect_err("must fail");
    assert!(e.to_string().contains("3 bytes, want 64"), "{e}");
    let e = Signature::parse("k:Ts$T").expect_err("must fail");
    assert!(
        matches!(
            e,
            SigningError::BadBase64 {
                ch: '$',
                offset: 4,
                ..
            }
        ),
        "{e}"
    );
}
