//! `.drv` files written by the real Nix 2.8.0, 2.26 and 2.34 (tests/golden/derivation/, made by
//! tests/golden/regen-derivation.sh): parsed, checked field by field and rendered back
//! byte-for-byte; then one test per class of malformed input, each checking the byte offset
//! and what the error says.

use ferry_nix::derivation::{Derivation, DerivationError, MAX_DRV_SIZE, OutputKind};
use ferry_nix::store_path::{StoreDir, StorePath};
use ferry_nix::wire::WireReader;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn sd() -> StoreDir {
    // The golden files come from a chroot store, whose logical store dir is /nix/store.
    StoreDir::new("/nix/store").expect("store dir")
}

fn golden(name: &str) -> Vec<u8> {
    let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/golden/derivation", name]
        .iter()
        .collect();
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn parse(name: &str) -> Derivation {
    Derivation::parse(&golden(name), &sd()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn path(p: &str) -> StorePath {
    sd().parse(p).expect("store path")
}

const GOLDEN: [&str; 5] = [
    "simple.drv",
    "fixed.drv",
    "fixed-rec.drv",
    "multi.drv",
    "dependent.drv",
];

/// Where each Nix version's files are: 2.8 at the top (regen-derivation.sh on this machine),
/// the others in nix-LABEL/ (regen-version.sh LABEL).
const VERSIONS: [&str; 3] = ["", "nix-2.26/", "nix-2.34/"];

#[test]
fn golden_files_render_byte_identically() {
    for name in VERSIONS
        .iter()
        .flat_map(|v| GOLDEN.iter().map(move |n| format!("{v}{n}")))
    {
        let name = name.as_str();
        let bytes = golden(name);
        let drv = parse(name);
        assert_eq!(
            drv.render(&sd()).as_bytes(),
            &bytes[..],
            "{name} does not render back identically"
        );
        // Reading through `read_from` gives the same result.
        let again = Derivation::read_from(&bytes[..], &sd()).expect("read_from");
        assert_eq!(again, drv);
    }
}

#[test]
fn golden_paths_list_every_file() {
    let text = String::from_utf8(golden("paths.txt")).expect("utf-8");
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_once(' ').expect("name path").0)
        .collect();
    assert_eq!(names, GOLDEN);
    // Nix 2.26 and 2.34 write the same derivations to the same paths as 2.8: the store path
    // of a .drv hashes its ATerm, so the files are the same too.
    for ver in &VERSIONS[1..] {
        let again = String::from_utf8(golden(&format!("{ver}paths.txt"))).expect("utf-8");
        assert_eq!(again, text, "{ver}");
    }
}

#[test]
fn simple_fields() {
    let d = parse("simple.drv");
    assert_eq!(d.outputs.len(), 1);
    let out = &d.outputs["out"];
    assert_eq!(out.kind(), OutputKind::InputAddressed);
    assert_eq!(
        out.path,
        Some(path(
            "/nix/store/6xw506i4rbjcff8srn12gcjngx3pc5nc-ferry-simple"
        ))
    );
    assert!(d.input_drvs.is_empty());
    assert_eq!(
        d.input_srcs,
        BTreeSet::from([path(
            "/nix/store/405dg5iw8ckdrcyx8yf5blsjfxsx1xk0-ferry-input.txt"
        )])
    );
    assert_eq!(d.platform, "x86_64-linux");
    assert_eq!(d.builder, "/bin/sh");
    assert_eq!(d.args, ["-c", "echo \"hello\" > $out", "a\\b", "tab\there"]);
    assert_eq!(d.env["quotes"], "say \"hi\" and 'bye'");
    assert_eq!(d.env["backslashes"], "C:\\dir\\ and \\n literally");
    assert_eq!(d.env["newlines"], "line one\nline two\r\nline three\n");
    assert_eq!(d.env["unicode"], "naïve – ✓");
    assert_eq!(d.env["PATH"], "/usr/bin:/bin");
}

#[test]
fn fixed_output_fields() {
    let d = parse("fixed.drv");
    let out = &d.outputs["out"];
    assert_eq!(out.kind(), OutputKind::FixedCa);
    assert_eq!(out.hash_algo, "sha256");
    assert_eq!(
        out.hash,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert!(out.path.is_some());

    let d = parse("fixed-rec.drv");
    let out = &d.outputs["out"];
    assert_eq!(out.kind(), OutputKind::FixedCa);
    assert_eq!(out.hash_algo, "r:sha1");
    assert_eq!(out.hash.len(), 40);
}

#[test]
fn multiple_outputs_are_sorted_by_name() {
    let d = parse("multi.drv");
    let names: Vec<&str> = d.outputs.keys().map(String::as_str).collect();
    assert_eq!(names, ["dev", "lib", "out"]);
    for (name, out) in &d.outputs {
        assert_eq!(out.kind(), OutputKind::InputAddressed);
        let p = out.path.as_ref().expect("path");
        assert_eq!(d.env[name], sd().display(p));
    }
}

#[test]
fn input_derivations() {
    let d = parse("dependent.drv");
    let inputs: Vec<(String, Vec<&str>)> = d
        .input_drvs
        .iter()
        .map(|(p, outs)| {
            (
                p.to_string(),
                outs.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        inputs,
        [
            (
                "33vxksxv4q76xwnj9ic5m4v9l2f4qm77-ferry-simple.drv".to_owned(),
                vec!["out"]
            ),
            (
                "qsymp87k3q0sxqywlv3nwjzjz8g7vr3g-ferry-multi.drv".to_owned(),
                vec!["dev", "lib"]
            ),
        ]
    );
    assert_eq!(d.input_srcs.len(), 2);
    assert_eq!(d.platform, "aarch64-linux");
    assert!(d.builder.ends_with("-ferry-simple/bin/tool"));

    // The BasicDerivation drops the input derivations; with a closure it replaces inputSrcs.
    let basic = d.to_basic();
    assert_eq!(basic.input_srcs, d.input_srcs);
    let closure = BTreeSet::from([
        path("/nix/store/6xw506i4rbjcff8srn12gcjngx3pc5nc-ferry-simple"),
        path("/nix/store/nwvvh6qd9qqhljlx60nqnilnbhvlv097-ferry-multi-dev"),
    ]);
    let basic = d.to_basic_with_inputs(closure.clone());
    assert_eq!(basic.input_srcs, closure);
    assert_eq!(basic.outputs, d.outputs);
    assert_eq!(basic.env, d.env);
}

#[test]
fn basic_derivation_wire_encoding() {
    // hook-protocol.md §4.3: outputs (name, path, hashAlgo, hash), inputSrcs, platform,
    // builder, args, env, in the wire format.
    let d = parse("fixed-rec.drv");
    let bytes = d.to_basic().to_wire(&sd());
    let mut r = WireReader::new(&bytes[..]);
    assert_eq!(r.read_u64().expect("count"), 1);
    assert_eq!(r.read_string(100).expect("name"), "out");
    assert_eq!(
        r.read_string(100).expect("path"),
        "/nix/store/zwxip0ss1dj37zl4sbpxp8zz6s2a98x9-ferry-fixed-rec"
    );
    assert_eq!(r.read_string(100).expect("algo"), "r:sha1");
    assert_eq!(r.read_string(100).expect("hash"), "0".repeat(40));
    assert!(r.read_strings(10, 100).expect("srcs").is_empty());
    assert_eq!(r.read_string(100).expect("platform"), "x86_64-linux");
    assert_eq!(r.read_string(100).expect("builder"), "/bin/sh");
    assert_eq!(r.read_strings(10, 100).expect("args"), ["-c", "mkdir $out"]);
    let n = r.read_u64().expect("env count");
    assert_eq!(n, d.env.len() as u64);
    for (k, v) in &d.env {
        assert_eq!(&r.read_string(1000).expect("key"), k);
        assert_eq!(&r.read_string(1000).expect("value"), v);
    }
    assert_eq!(r.offset(), bytes.len() as u64);
}

// --- malformed input: one test per class ---

fn simple_text() -> String {
    String::from_utf8(golden("simple.drv")).expect("utf-8")
}

/// Parses `text` expecting an error; returns it with its message.
fn fail(text: &str) -> (DerivationError, String) {
    let e = Derivation::parse(text.as_bytes(), &sd()).expect_err("must fail");
    let msg = e.to_string();
    (e, msg)
}

/// `text` with the first occurrence of `from` replaced, and the offset of the replacement.
fn edit(text: &str, from: &str, to: &str) -> (String, usize) {
    let at = text
        .find(from)
        .unwrap_or_else(|| panic!("{from:?} not in the text"));
    (text.replacen(from, to, 1), at)
}

#[test]
fn truncated_anywhere() {
    let text = simple_text();
    for cut in [
        0,
        5,
        8,
        40,
        100,
        text.len() / 2,
        text.len() - 2,
        text.len() - 1,
    ] {
        let (e, msg) = fail(&text[..cut]);
        assert!(
            matches!(e, DerivationError::Truncated { offset, .. } if offset == cut),
            "cut at {cut}: {msg}"
        );
        assert!(
            msg.contains(&format!("truncated at byte offset {cut}")),
            "{msg}"
        );
    }
}

#[test]
fn bad_escape() {
    let (text, at) = edit(&simple_text(), "a\\\\b", "a\\qb");
    let (e, msg) = fail(&text);
    assert!(
        matches!(e, DerivationError::BadEscape { offset, ch: 'q' } if offset == at + 1),
        "{msg}"
    );
    assert!(msg.contains("unknown escape '\\q'"), "{msg}");
}

#[test]
fn missing_comma() {
    // Nix's `endOfList` would read `["-c""echo…"]` as two items; we want the comma.
    let (text, at) = edit(&simple_text(), "[\"-c\",", "[\"-c\"");
    let (e, msg) = fail(&text);
    assert!(
        matches!(e, DerivationError::Expected { offset, expected: "',' or ']'", .. } if offset == at + 5),
        "{msg}"
    );
    assert!(msg.contains(&format!("byte offset {}", at + 5)), "{msg}");
}

#[test]
fn missing_paren() {
    let text = simple_text();
    // The ')' closing the only output.
    let (text, at) = edit(&text, "\"\",\"\")],", "\"\",\"\"],");
    let (e, msg) = fail(&text);
    let want = at + 5;
    assert!(
        matches!(e, DerivationError::Expected { offset, expected, .. }
            if offset == want && expected.contains("')' after an output")),
        "{msg}"
    );
    // And a missing final paren is a truncation at the end.
    let text = simple_text();
    let (e, msg) = fail(&text[..text.len() - 1]);
    assert!(
        matches!(e, DerivationError::Truncated { expected, .. } if expected.contains("closing ')'")),
        "{msg}"
    );
}

#[test]
fn bad_store_paths() {
    let text = simple_text();
    // Wrong store directory for an input source.
    let (t, at) = edit(&text, "[\"/nix/store/405dg", "[\"/gnu/store/405dg");
    let (e, msg) = fail(&t);
    assert!(
        matches!(e, DerivationError::BadStorePath { offset, field: "input source", .. } if offset == at + 1),
        "{msg}"
    );
    assert!(msg.contains("/gnu/store"), "{msg}");
    // A character outside Nix base-32 in the hash part of the output path.
    let (t, at) = edit(
        &text,
        "(\"out\",\"/nix/store/6xw5",
        "(\"out\",\"/nix/store/exw5",
    );
    let (e, msg) = fail(&t);
    assert!(
        matches!(e, DerivationError::BadStorePath { offset, field: "output path", .. } if offset == at + 7),
        "{msg}"
    );
}

#[test]
fn unsorted_and_duplicate_keys() {
    // Nix reads env, outputs and inputs into std::map / std::set, so it would accept these
    // and silently sort or merge; it never writes them, and we refuse them.
    let text = simple_text();
    let (t, at) = edit(&text, "(\"PATH\",", "(\"zzzz\",");
    let (e, msg) = fail(&t);
    // The next key, "backslashes", is the one found out of order.
    let next = t[at..].find("(\"backslashes\"").expect("next key") + at + 1;
    assert!(
        matches!(&e, DerivationError::Unsorted { offset, field: "environment variable", key, prev }
            if *offset == next && key == "backslashes" && prev == "zzzz"),
        "{msg}"
    );

    let multi = String::from_utf8(golden("multi.drv")).expect("utf-8");
    let (t, at) = edit(&multi, "(\"lib\",", "(\"dev\",");
    let (e, msg) = fail(&t);
    assert!(
        matches!(&e, DerivationError::Duplicate { offset, field: "output", key } if *offset == at + 1 && key == "dev"),
        "{msg}"
    );
}

#[test]
fn escapes_where_nix_writes_none_and_raw_controls_where_it_escapes() {
    let text = simple_text();
    let (t, at) = edit(
        &text,
        "\"x86_64-linux\",\"/bin/sh\"",
        "\"x86\\\\64\",\"/bin/sh\"",
    );
    let (e, msg) = fail(&t);
    assert!(
        matches!(e, DerivationError::EscapeInPlainField { offset, field: "platform" } if offset == at + 4),
        "{msg}"
    );
    let (t, at) = edit(&text, "\"/bin/sh\",[", "\"/bin\n/sh\",[");
    let (e, msg) = fail(&t);
    assert!(
        matches!(e, DerivationError::RawControl { offset, field: "builder", ch: '\n' } if offset == at + 5),
        "{msg}"
    );
}

#[test]
fn bad_outputs() {
    let fixed = String::from_utf8(golden("fixed.drv")).expect("utf-8");
    let (t, at) = edit(&fixed, "\"sha256\",\"2cf2", "\"sha257\",\"2cf2");
    let (e, msg) = fail(&t);
    assert!(
        matches!(e, DerivationError::BadOutput { offset, .. } if offset == at),
        "{msg}"
    );
    assert!(msg.contains("unknown hash algorithm \"sha257\""), "{msg}");
    let (t, at) = edit(&fixed, "\"2cf24dba", "\"2CF24dba");
    let (e, msg) = fail(&t);
    assert!(
        matches!(e, DerivationError::BadOutput { offset, .. } if offset == at),
        "{msg}"
    );
    assert!(msg.contains("lower-case base-16"), "{msg}");
}

#[test]
fn trailing_data_and_not_utf8() {
    let text = simple_text();
    let (e, msg) = fail(&format!("{text}\n"));
    assert!(
        matches!(e, DerivationError::TrailingData { offset } if offset == text.len()),
        "{msg}"
    );
    let mut bytes = text.into_bytes();
    bytes[20] = 0xff;
    let e = Derivation::parse(&bytes, &sd()).expect_err("not UTF-8");
    assert!(matches!(e, DerivationError::NotUtf8 { offset: 20 }), "{e}");
}

#[test]
fn wrong_start() {
    let (e, msg) = fail("Derivation([");
    assert!(
        matches!(e, DerivationError::Expected { offset: 0, .. }),
        "{msg}"
    );
    assert!(msg.contains("\"Derive([\""), "{msg}");
}

#[test]
fn over_the_size_cap() {
    let big = std::io::Read::take(std::io::repeat(b' '), MAX_DRV_SIZE + 10);
    let e = Derivation::read_from(big, &sd()).expect_err("too large");
    assert!(
        matches!(e, DerivationError::TooLarge { limit, .. } if limit == MAX_DRV_SIZE),
        "{e}"
    );
    assert!(e.to_string().contains("the limit is 67108864 bytes"), "{e}");
}
