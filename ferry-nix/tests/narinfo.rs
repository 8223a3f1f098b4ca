//! narinfo parsing, rendering, fingerprints and signatures against narinfos written by Nix
//! 2.8.0, 2.26 and 2.34 (`nix copy --to file://…`, see `golden/regen-narinfo.sh`, run for the
//! newer versions by `golden/regen-version.sh`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use ferry_nix::hash::Hash;
use ferry_nix::narinfo::{CacheInfo, NarInfo, NarInfoError, fingerprint};
use ferry_nix::signing::{PublicKey, SecretKey, Signature, SigningError, TrustedKeys};
use ferry_nix::store_path::{StoreDir, StorePath, StorePathError};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/narinfo")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(golden_dir().join(rel)).expect("golden file")
}

fn sd() -> StoreDir {
    StoreDir::new("/nix/store").expect("store dir")
}

/// The golden caches, uncompressed and xz: Nix 2.8 at the top (regen-narinfo.sh on this
/// machine), 2.26 and 2.34 in nix-LABEL/ (regen-version.sh LABEL): the same objects and
/// keys, so every test holds for each.
const CACHES: [&str; 6] = [
    "none",
    "xz",
    "nix-2.26/none",
    "nix-2.26/xz",
    "nix-2.34/none",
    "nix-2.34/xz",
];

/// Every golden narinfo as (file name, text), both caches.
fn golden_narinfos() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for cache in CACHES {
        let mut names: Vec<_> = std::fs::read_dir(golden_dir().join(cache))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .filter(|n| n.ends_with(".narinfo"))
            .collect();
        names.sort();
        for n in names {
            let rel = format!("{cache}/{n}");
            let text = read(&rel);
            out.push((rel, text));
        }
    }
    assert_eq!(out.len(), 30, "5 paths in 2 caches from 3 versions");
    out
}

fn keys() -> (SecretKey, SecretKey) {
    let k1 = SecretKey::parse(&read("ferry-test-1.sec")).expect("key 1");
    let k2 = SecretKey::parse(&read("ferry-test-2.sec")).expect("key 2");
    (k1, k2)
}

fn by_name(path: &str) -> NarInfo {
    let (_, text) = golden_narinfos()
        .into_iter()
        .find(|(n, t)| {
            n.starts_with("none/") && t.lines().next().is_some_and(|l| l.ends_with(path))
        })
        .expect("golden path");
    NarInfo::parse(&sd(), &text).expect("parse")
}

#[test]
fn golden_narinfos_round_trip_byte_identically() {
    for (name, text) in golden_narinfos() {
        let ni = NarInfo::parse(&sd(), &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ni.render(&sd()), text, "{name}");
        assert_eq!(
            NarInfo::parse(&sd(), &ni.render(&sd())).expect("reparse"),
            ni
        );
        assert_eq!(
            format!("{}.narinfo", ni.store_path.hash_part()),
            name.rsplit('/').next().expect("name")
        );
        let file_hash = ni.file_hash.as_ref().expect("Nix writes FileHash");
        assert!(
            ni.url
                .starts_with(&format!("nar/{}.nar", file_hash.to_nix32())),
            "{name}"
        );
        if name.contains("none/") {
            assert_eq!(ni.compression, "none");
            assert_eq!(Some(&ni.nar_hash), ni.file_hash.as_ref());
            assert_eq!(Some(ni.nar_size), ni.file_size);
        } else {
            assert_eq!(ni.compression, "xz");
            assert!(ni.url.ends_with(".nar.xz"));
        }
        assert_eq!(ni.sigs.len(), 2, "{name}");
    }
}

#[test]
fn golden_fields_are_what_nix_recorded() {
    let built = by_name("-with-refs");
    let refs: Vec<&str> = built.references.iter().map(StorePath::as_str).collect();
    // Sorted by base name, and including the path itself.
    assert_eq!(
        refs,
        [
            "3bvflnfjlf79a68vqvhrabn9nivrqrkm-with-refs",
            "kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt"
        ]
    );
    assert_eq!(
        built.deriver.as_ref().map(StorePath::as_str),
        Some("858wc1x1m91n91j6hswawlvxazxgbbjs-with-refs.drv")
    );
    assert_eq!(built.ca, None);
    let fp = built.fingerprint(&sd()).expect("fp");
    assert_eq!(
        fp,
        "1;/nix/store/3bvflnfjlf79a68vqvhrabn9nivrqrkm-with-refs;\
         sha256:008hmlkajc3pm2gl59vjqvq601caqn9rm66p7xq6760zb5viprdv;224;\
         /nix/store/3bvflnfjlf79a68vqvhrabn9nivrqrkm-with-refs,\
         /nix/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt"
    );

    let flat = by_name("-flat.txt");
    assert!(flat.references.is_empty());
    assert!(flat.fingerprint(&sd()).expect("fp").ends_with(";144;"));
    assert_eq!(
        flat.ca.as_deref(),
        Some("fixed:sha256:0cck815d930ljlfnqb7q1jfvx52dry3rimqna6n3a8ccmdcchp10")
    );
    assert!(
        by_name("-mentions-hello")
            .ca
            .expect("ca")
            .starts_with("text:sha256:")
    );
    assert!(
        by_name("-tree")
            .ca
            .expect("ca")
            .starts_with("fixed:r:sha256:")
    );
}

#[test]
fn ferry_signatures_equal_nix_signatures() {
    let (k1, k2) = keys();
    for (name, text) in golden_narinfos() {
        let ni = NarInfo::parse(&sd(), &text).expect("parse");
        let fp = ni.fingerprint(&sd()).expect("fp");
        let ours: BTreeSet<Signature> = [k1.sign(fp.as_bytes()), k2.sign(fp.as_bytes())].into();
        assert_eq!(ours, ni.sigs, "{name}");

        // Re-signing an unsigned copy reproduces Nix's file byte for byte.
        let mut bare = ni.clone();
        bare.sigs.clear();
        bare.sign(&sd(), &k2).expect("sign");
        bare.sign(&sd(), &k1).expect("sign");
        bare.sign(&sd(), &k1).expect("sign again adds nothing");
        assert_eq!(bare.render(&sd()), text, "{name}");

        assert!(ni.verify_with(&sd(), &k1.to_public()).expect("verify"));
        assert!(ni.verify_with(&sd(), &k2.to_public()).expect("verify"));
    }
}

#[test]
fn nix_store_sign_signatures_match() {
    // `nix store sign --key-file ferry-test-1.sec` then `nix path-info --json`: one line per
    // signature, "<store path> <sig>".
    let (k1, _) = keys();
    for ver in ["", "nix-2.26/", "nix-2.34/"] {
        let sigs = read(&format!("{ver}sigs.txt"));
        assert_eq!(sigs.lines().count(), 5, "{ver}");
        for line in sigs.lines() {
            let (path, sig) = line.split_once(' ').expect("two fields");
            let ni = by_name(path.rsplit_once('/').expect("slash").1);
            assert_eq!(sd().display(&ni.store_path), path);
            let nix_sig = Signature::parse(sig).expect("sig");
            let fp = ni.fingerprint(&sd()).expect("fp");
            assert_eq!(k1.sign(fp.as_bytes()), nix_sig, "{ver} {path}");
            assert!(k1.to_public().verify(fp.as_bytes(), &nix_sig));
        }
    }
}

#[test]
fn trust_decisions() {
    let (k1, k2) = keys();
    let ni = by_name("-with-refs");
    let t1 = TrustedKeys::parse_list(&read("ferry-test-1.pub")).expect("trusted");
    assert!(ni.is_trusted(&sd(), &t1).expect("trust"));
    let both = TrustedKeys::parse_list(&format!(
        "{} {}",
        read("ferry-test-1.pub"),
        read("ferry-test-2.pub")
    ))
    .expect("trusted");
    assert_eq!(ni.count_valid_sigs(&sd(), &both).expect("count"), 2);

    // A signature for another path, or a changed signed field, is not trusted.
    let mut moved = ni.clone();
    moved.nar_size += 1;
    assert!(!moved.is_trusted(&sd(), &both).expect("trust"));
    let mut unsigned_change = ni.clone();
    unsigned_change.url = "nar/elsewhere.nar".into();
    unsigned_change.compression = "zstd".into();
    assert!(unsigned_change.is_trusted(&sd(), &both).expect("trust"));

    let stranger = SecretKey::from_seed("stranger", [9; 32]).expect("key");
    let mut other = ni.clone();
    other.sigs.clear();
    other.sign(&sd(), &stranger).expect("sign");
    assert!(!other.is_trusted(&sd(), &both).expect("trust"));
    assert!(
        !ni.verify_with(&sd(), &stranger.to_public())
            .expect("verify")
    );
    let _ = (k1, k2);
}

#[test]
fn golden_cache_info() {
    for cache in CACHES {
        let text = read(&format!("{cache}/nix-cache-info"));
        let ci = CacheInfo::parse(&text).expect("parse");
        assert_eq!(ci.store_dir, Some(sd()));
        assert_eq!(ci.want_mass_query, None);
        assert_eq!(ci.render(), text);
    }
}

#[test]
fn cache_nixos_org_fingerprint_vector() {
    // docs/upload.md §3.4: references given unsorted come out sorted.
    let sd = sd();
    let refs: Vec<StorePath> = [
        "yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n",
        "0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0",
        "j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12",
        "6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115",
    ]
    .iter()
    .map(|b| StorePath::from_base_name(b).expect("ref"))
    .collect();
    let path = StorePath::from_base_name("syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin")
        .expect("path");
    let nar_hash =
        Hash::parse_any_prefixed("sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0")
            .expect("hash");
    let fp = fingerprint(&sd, &path, &nar_hash, 196040, &refs).expect("fp");
    assert_eq!(
        fp,
        "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
    );
    let ni = NarInfo {
        store_path: path,
        url: "nar/x.nar.xz".into(),
        compression: "xz".into(),
        file_hash: None,
        file_size: None,
        // The same hash in SRI form: the fingerprint always uses sha256:<nix32>.
        nar_hash: Hash::parse_any_prefixed(&nar_hash.to_sri()).expect("sri"),
        nar_size: 196040,
        references: refs.into_iter().collect(),
        deriver: None,
        system: None,
        sigs: [Signature::parse(
            "cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==",
        )
        .expect("sig")]
        .into(),
        ca: None,
    };
    let trusted =
        TrustedKeys::parse_list("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
            .expect("key");
    assert!(ni.is_trusted(&sd, &trusted).expect("trust"));
    assert_eq!(NarInfo::parse(&sd, &ni.render(&sd)).expect("reparse"), ni);
}

#[test]
fn fingerprint_refuses_unknown_size_and_other_algorithms() {
    let mut ni = by_name("-hello.txt");
    ni.nar_size = 0;
    let e = ni.fingerprint(&sd()).expect_err("must fail");
    assert!(matches!(e, NarInfoError::FingerprintZeroSize { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt"),
        "{e}"
    );
    let mut ni = by_name("-hello.txt");
    ni.nar_hash = Hash::new(ferry_nix::hash::HashAlgo::Sha512, vec![1; 64]).expect("hash");
    let e = ni.fingerprint(&sd()).expect_err("must fail");
    assert!(e.to_string().contains("sha512"), "{e}");
    let (k1, _) = keys();
    assert!(ni.sign(&sd(), &k1).is_err());
}

#[test]
fn other_store_dirs_work() {
    // The same narinfo for a store at /gnu/store: only StorePath and the fingerprint change.
    let text = read("none/3bvflnfjlf79a68vqvhrabn9nivrqrkm.narinfo");
    let gnu = StoreDir::new("/gnu/store").expect("dir");
    let e = NarInfo::parse(&gnu, &text).expect_err("must fail");
    assert!(
        matches!(
            &e,
            NarInfoError::BadStorePath {
                line: 1,
                field: "StorePath",
                source: StorePathError::NotInStore { .. }
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("line 1") && e.to_string().contains("/gnu/store"),
        "{e}"
    );
    let moved = text.replacen("/nix/store/", "/gnu/store/", 1);
    let ni = NarInfo::parse(&gnu, &moved).expect("parse");
    assert_eq!(ni.render(&gnu), moved);
    assert!(
        ni.fingerprint(&gnu)
            .expect("fp")
            .ends_with(",/gnu/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt")
    );
}

/// A minimal valid narinfo with its lines numbered 1–6.
const BASE: &str = "StorePath: /nix/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt
URL: nar/1gpaf2nkphc3f4wbcxnhsd34q9d9zykz0r0sddyslhbiiiiw7dyy.nar
Compression: none
NarHash: sha256:1gpaf2nkphc3f4wbcxnhsd34q9d9zykz0r0sddyslhbiiiiw7dyy
NarSize: 128
References: 
";

fn parse_err(text: &str) -> NarInfoError {
    assert!(NarInfo::parse(&sd(), BASE).is_ok(), "BASE must be valid");
    NarInfo::parse(&sd(), text).expect_err("must be rejected")
}

/// Which error `e` is, with the line and field it names; panics on the errors that name no
/// field.
fn located(e: &NarInfoError) -> (&'static str, usize, &'static str) {
    match *e {
        NarInfoError::BadHash { line, field, .. } => ("BadHash", line, field),
        NarInfoError::BadNumber { line, field, .. } => ("BadNumber", line, field),
        NarInfoError::BadStorePath { line, field, .. } => ("BadStorePath", line, field),
        _ => panic!("not an error at a line and field: {e}"),
    }
}

fn drop_line(prefix: &str) -> String {
    BASE.lines()
        .filter(|l| !l.starts_with(prefix))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn missing_required_fields() {
    for (field, want) in [
        ("StorePath", "StorePath"),
        ("URL", "URL"),
        ("NarHash", "NarHash"),
    ] {
        let e = parse_err(&drop_line(field));
        assert!(
            matches!(e, NarInfoError::Missing(f) if f == want),
            "{field}: {e}"
        );
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = parse_err(&drop_line("NarSize"));
    assert!(matches!(e, NarInfoError::ZeroNarSize), "{e}");
    let e = parse_err(&BASE.replace("NarSize: 128", "NarSize: 0"));
    assert!(matches!(e, NarInfoError::ZeroNarSize), "{e}");
    assert!(e.to_string().contains("NarSize 0"), "{e}");
    // An empty URL counts as missing, as in Nix.
    let e = parse_err(&BASE.replace(
        "URL: nar/1gpaf2nkphc3f4wbcxnhsd34q9d9zykz0r0sddyslhbiiiiw7dyy.nar",
        "URL: ",
    ));
    assert!(matches!(e, NarInfoError::Missing("URL")), "{e}");
}

#[test]
fn bad_hash_names_field_and_line() {
    let e = parse_err(&BASE.replace("NarHash: sha256:1gpaf", "NarHash: sha256:1gpae"));
    assert_eq!(located(&e), ("BadHash", 4, "NarHash"), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("line 4") && msg.contains("NarHash"), "{msg}");
    let e = parse_err(&format!("{BASE}FileHash: md5:abc\n"));
    assert_eq!(located(&e), ("BadHash", 7, "FileHash"), "{e}");
}

#[test]
fn bad_numbers() {
    for v in ["-1", "+128", "12x", "", "99999999999999999999"] {
        let e = parse_err(&BASE.replace("NarSize: 128", &format!("NarSize: {v}")));
        assert_eq!(located(&e), ("BadNumber", 5, "NarSize"), "{v}: {e}");
    }
    let e = parse_err(&format!("{BASE}FileSize: ten\n"));
    assert!(
        e.to_string().contains("line 7") && e.to_string().contains("FileSize"),
        "{e}"
    );
}

#[test]
fn bad_reference_and_deriver() {
    let e = parse_err(&BASE.replace(
        "References: ",
        "References: kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt /nix/store/x",
    ));
    assert_eq!(located(&e), ("BadStorePath", 6, "References"), "{e}");
    assert!(e.to_string().contains("/nix/store/x"), "{e}");
    let e = parse_err(&format!("{BASE}Deriver: not-a-path.drv\n"));
    assert_eq!(located(&e), ("BadStorePath", 7, "Deriver"), "{e}");
    let ok = NarInfo::parse(&sd(), &format!("{BASE}Deriver: unknown-deriver\n"))
        .expect("unknown-deriver");
    assert_eq!(ok.deriver, None);
    assert_eq!(ok.render(&sd()), BASE);
}

#[test]
fn store_path_in_another_store_dir() {
    let e = parse_err(&BASE.replace("/nix/store/", "/opt/store/"));
    assert_eq!(located(&e), ("BadStorePath", 1, "StorePath"), "{e}");
    assert!(e.to_string().contains("/opt/store"), "{e}");
}

#[test]
fn line_without_colon_names_the_line() {
    let e = parse_err(&BASE.replace("Compression: none", "Compression none"));
    assert!(matches!(e, NarInfoError::NoColon { line: 3 }), "{e}");
    assert!(e.to_string().contains("line 3"), "{e}");
    // "Key:value" without the space, and blank lines, are not 'Key: value' either.
    let e = parse_err(&BASE.replace("Compression: none", "Compression:none"));
    assert!(matches!(e, NarInfoError::NoColon { line: 3 }), "{e}");
    let e = parse_err(&format!("{BASE}\n"));
    assert!(matches!(e, NarInfoError::NoColon { line: 7 }), "{e}");
}

#[test]
fn missing_final_newline() {
    let e = parse_err(BASE.trim_end_matches('\n'));
    assert!(matches!(e, NarInfoError::MissingNewline { line: 6 }), "{e}");
}

#[test]
fn bad_sig() {
    let e = parse_err(&format!("{BASE}Sig: ferry-test-1:AAAA\n"));
    assert!(
        matches!(
            &e,
            NarInfoError::BadSignature {
                line: 7,
                source: SigningError::WrongLength { got: 3, .. }
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("line 7") && e.to_string().contains("Sig"),
        "{e}"
    );
    let e = parse_err(&format!("{BASE}Sig: no-colon\n"));
    assert!(
        matches!(e, NarInfoError::BadSignature { line: 7, .. }),
        "{e}"
    );
}

#[test]
fn bad_ca() {
    let e = parse_err(&format!("{BASE}CA: fixed:r:sha256:nothex\n"));
    assert!(matches!(e, NarInfoError::BadCa { line: 7, .. }), "{e}");
    // Empty CA means none, as in Nix.
    let ok = NarInfo::parse(&sd(), &format!("{BASE}CA: \n")).expect("empty CA");
    assert_eq!(ok.ca, None);
}

#[test]
fn sigs_are_a_sorted_set() {
    let (k1, k2) = keys();
    let mut ni = NarInfo::parse(&sd(), BASE).expect("parse");
    ni.sign(&sd(), &k2).expect("sign");
    ni.sign(&sd(), &k1).expect("sign");
    let text = ni.render(&sd());
    let sig_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Sig: ")).collect();
    assert_eq!(sig_lines.len(), 2);
    assert!(sig_lines[0].starts_with("Sig: ferry-test-1:"));
    // Written in the other order and twice, parsing gives the same set.
    let swapped = format!(
        "{BASE}{}\n{}\n{}\n",
        sig_lines[1], sig_lines[0], sig_lines[1]
    );
    assert_eq!(NarInfo::parse(&sd(), &swapped).expect("parse"), ni);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn store_path() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), "[a-zA-Z0-9+_?=][a-zA-Z0-9+._?=-]{0,20}")
            .prop_map(|(d, n)| StorePath::from_parts(d, &n).expect("valid name"))
    }

    fn narinfo() -> impl Strategy<Value = NarInfo> {
        (
            store_path(),
            "nar/[a-z0-9]{1,52}\\.nar(\\.xz|\\.zst)?",
            prop::sample::select(vec!["none", "xz", "zstd", "bzip2", "br"]),
            prop::option::of((any::<[u8; 32]>(), any::<u64>())),
            (any::<[u8; 32]>(), 1u64..),
            prop::collection::btree_set(store_path(), 0..5),
            prop::option::of(store_path()),
            prop::collection::vec(
                (
                    "[a-z][a-z0-9.-]{0,12}",
                    prop::collection::vec(any::<u8>(), 64),
                ),
                0..3,
            ),
            prop::option::of(any::<[u8; 32]>()),
        )
            .prop_map(
                |(sp, url, comp, file, (nh, ns), refs, drv, sigs, ca)| NarInfo {
                    store_path: sp,
                    url,
                    compression: comp.to_string(),
                    file_hash: file.map(|(h, _)| Hash::sha256_bytes(h)),
                    file_size: file.map(|(_, s)| s),
                    nar_hash: Hash::sha256_bytes(nh),
                    nar_size: ns,
                    references: refs,
                    deriver: drv,
                    system: None,
                    sigs: sigs
                        .into_iter()
                        .map(|(n, b)| Signature::new(&n, b.try_into().expect("64")).expect("sig"))
                        .collect(),
                    ca: ca
                        .map(|h| format!("fixed:r:{}", Hash::sha256_bytes(h).to_nix32_prefixed())),
                },
            )
    }

    proptest! {
        #[test]
        fn render_then_parse_is_identity(ni in narinfo()) {
            let text = ni.render(&sd());
            let back = NarInfo::parse(&sd(), &text).expect("parse rendered");
            prop_assert_eq!(&back, &ni);
            prop_assert_eq!(back.render(&sd()), text);
        }

        #[test]
        fn parse_never_panics(text in "(StorePath|URL|NarHash|NarSize|References|Sig|CA|Deriver|[A-Za-z]{0,5})(: |:)?[ -~]{0,80}\n?") {
            let _ = NarInfo::parse(&sd(), &text);
            let _ = CacheInfo::parse(&text);
        }

        #[test]
        fn signing_then_verifying(ni in narinfo(), seed in any::<[u8; 32]>()) {
            let key = SecretKey::from_seed("prop-1", seed).expect("key");
            let mut ni = ni;
            ni.sign(&sd(), &key).expect("sign");
            prop_assert!(ni.verify_with(&sd(), &key.to_public()).expect("verify"));
            let pk: PublicKey = key.to_public().to_string().parse().expect("pk");
            let trusted = { let mut t = TrustedKeys::new(); t.insert(pk); t };
            prop_assert!(ni.is_trusted(&sd(), &trusted).expect("trust"));
        }
    }
}
