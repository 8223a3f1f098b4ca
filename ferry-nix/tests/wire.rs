//! Wire format against real Nix 2.8.0 bytes (tests/golden/wire/, made by
//! tests/golden/regen-wire.sh), malformed input, and sync/async round trips.
//!
//! Every decoding test runs twice, through `WireReader` and `AsyncWireReader`, from one body:
//! the `$aw` macro argument is either nothing or `.await`.

use ferry_nix::hash::Hash;
use ferry_nix::store_path::StoreDir;
use ferry_nix::wire::{AsyncWireReader, AsyncWireWriter, WireError, WireReader, WireWriter};
use proptest::prelude::*;
use std::path::PathBuf;

const SERVE_MAGIC_1: u64 = 0x390c_9deb;
const SERVE_MAGIC_2: u64 = 0x5452_eecb;
const SERVE_VERSION: u64 = 0x207;
const MAX_PATHS: usize = 1000;
const MAX_STR: u64 = 4096;

/// The golden directories under tests/golden/wire/ of each Nix version in
/// integration/nix-versions: 2.8 at the top (regen-wire.sh on this machine), the others in
/// nix-LABEL/ (regen-version.sh LABEL runs the same script in that version's root).
const VERSIONS: [&str; 3] = ["", "nix-2.26", "nix-2.34"];

fn golden_in(ver: &str, name: &str) -> Vec<u8> {
    let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/golden/wire", ver, name]
        .iter()
        .collect();
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn golden(name: &str) -> Vec<u8> {
    golden_in("", name)
}

fn golden_text(ver: &str, name: &str) -> String {
    String::from_utf8(golden_in(ver, name)).expect("golden text is UTF-8")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// One path info as printed by `nix-store -q` / `nix path-info` (serve-expected.txt), or as
/// decoded from a serve-protocol QueryPathInfos reply.
#[derive(Debug, Default, PartialEq)]
struct PathInfo {
    path: String,
    deriver: String,
    references: Vec<String>,
    nar_size: u64,
    nar_hash: String,
    ca: String,
}

struct ServeExpected {
    requested: Vec<String>,
    infos: Vec<PathInfo>,
}

fn serve_expected(ver: &str) -> ServeExpected {
    let mut requested = Vec::new();
    let mut infos: Vec<PathInfo> = Vec::new();
    for line in golden_text(ver, "serve-expected.txt").lines() {
        let (key, value) = line.split_once(' ').expect("key value");
        let value = value.to_owned();
        if key == "request" {
            requested.push(value);
            continue;
        }
        if key == "path" {
            infos.push(PathInfo {
                path: value,
                ..PathInfo::default()
            });
            continue;
        }
        let info = infos.last_mut().expect("a path line first");
        match key {
            "deriver" => info.deriver = value,
            "reference" => info.references.push(value),
            "nar-size" => info.nar_size = value.parse().expect("nar-size"),
            "nar-hash" => info.nar_hash = value,
            "ca" => info.ca = value,
            other => panic!("unknown key {other}"),
        }
    }
    ServeExpected { requested, infos }
}

fn hook_expected(ver: &str, key: &str) -> String {
    golden_text(ver, "hook-expected.txt")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::to_owned))
        .unwrap_or_else(|| panic!("no {key} in hook-expected.txt"))
}

/// Writes the request regen-wire.sh fed to `nix-store --serve`.
macro_rules! encode_serve_request {
    ($w:expr, $paths:expr, $($aw:tt)*) => {{
        let w = $w;
        w.write_u64(SERVE_MAGIC_1)$($aw)*?;
        w.write_u64(SERVE_VERSION)$($aw)*?;
        w.write_u64(1)$($aw)*?; // QueryValidPaths
        w.write_bool(false)$($aw)*?; // lock
        w.write_bool(false)$($aw)*?; // substitute
        w.write_strings($paths)$($aw)*?;
        w.write_u64(2)$($aw)*?; // QueryPathInfos
        w.write_strings($paths)$($aw)*?;
        w.flush()$($aw)*?;
        std::io::Result::Ok(())
    }};
}

/// Decodes the server's side of that session (docs/hook-protocol.md §4.1, §4.2; Nix 2.8
/// `opServe` in `src/nix-store/nix-store.cc`): handshake, the valid-path set, then path infos
/// ending with an empty path. Returns the server version, valid paths and infos.
macro_rules! decode_serve_reply {
    ($r:expr, $($aw:tt)*) => {{
        let r = $r;
        let magic = r.read_u64()$($aw)*?;
        assert_eq!(magic, SERVE_MAGIC_2, "server magic");
        let version = r.read_u64()$($aw)*?;
        let valid = r.read_strings(MAX_PATHS, MAX_STR)$($aw)*?;
        let mut infos = Vec::new();
        loop {
            let path = r.read_string(MAX_STR)$($aw)*?;
            if path.is_empty() {
                break;
            }
            let deriver = r.read_string(MAX_STR)$($aw)*?;
            let references = r.read_strings(MAX_PATHS, MAX_STR)$($aw)*?;
            let download_size = r.read_u64()$($aw)*?;
            let nar_size = r.read_u64()$($aw)*?;
            // The 2.8 server sends narSize as the download size.
            assert_eq!(download_size, nar_size);
            // Protocol ≥ 2.4 adds narHash, ca and sigs.
            let nar_hash = r.read_string(MAX_STR)$($aw)*?;
            let ca = r.read_string(MAX_STR)$($aw)*?;
            let sigs = r.read_strings(MAX_PATHS, MAX_STR)$($aw)*?;
            assert!(sigs.is_empty(), "nothing signed these paths: {sigs:?}");
            infos.push(PathInfo { path, deriver, references, nar_size, nar_hash, ca });
        }
        Result::<_, WireError>::Ok((version, valid, infos))
    }};
}

fn check_serve_reply(
    ver: &str,
    version: u64,
    valid: Vec<String>,
    infos: Vec<PathInfo>,
    offset: u64,
    reply_len: usize,
) {
    let want = serve_expected(ver);
    assert_eq!(version >> 8, 2, "serve protocol major");
    // Nix 2.8, 2.26 and 2.34 all answer 2.7 (their SERVE_PROTOCOL_VERSION).
    assert_eq!(version, SERVE_VERSION, "{ver}");
    // The server answers with a sorted set of the valid ones: everything but the missing path.
    let mut want_valid: Vec<String> = want.infos.iter().map(|i| i.path.clone()).collect();
    want_valid.sort();
    assert_eq!(valid, want_valid);
    assert_eq!(want.requested.len(), 3);
    assert_eq!(infos, want.infos);
    // The values are well-formed for the rest of the library too.
    let dir = StoreDir::new("/nix/store").expect("store dir");
    for i in &infos {
        dir.parse(&i.path).expect("path");
        Hash::parse_any_prefixed(&i.nar_hash).expect("narHash");
        for r in &i.references {
            dir.parse(r).expect("reference");
        }
    }
    assert!(!infos[1].deriver.is_empty() && infos[1].references.len() == 2);
    assert!(infos[0].ca.starts_with("fixed:r:sha256:"));
    assert_eq!(offset, reply_len as u64, "the whole reply was consumed");
}

#[test]
fn serve_request_reencodes_byte_for_byte() {
    for ver in VERSIONS {
        let want = golden_in(ver, "serve-request.bin");
        let paths = serve_expected(ver).requested;
        let mut w = WireWriter::new(Vec::new());
        (|| encode_serve_request!(&mut w, &paths,))().expect("sync write");
        assert_eq!(w.into_inner(), want, "WireWriter {ver}");

        let mut w = AsyncWireWriter::new(Vec::new());
        block_on(async { encode_serve_request!(&mut w, &paths, .await) }).expect("async write");
        assert_eq!(w.into_inner(), want, "AsyncWireWriter {ver}");
    }
}

#[test]
fn serve_reply_decodes_sync() {
    for ver in VERSIONS {
        let reply = golden_in(ver, "serve-reply.bin");
        let mut r = WireReader::new(&reply[..]);
        let (version, valid, infos) = (|| decode_serve_reply!(&mut r,))().expect("decode");
        check_serve_reply(ver, version, valid, infos, r.offset(), reply.len());
    }
}

#[test]
fn serve_reply_decodes_async() {
    for ver in VERSIONS {
        let reply = golden_in(ver, "serve-reply.bin");
        let mut r = AsyncWireReader::new(&reply[..]);
        let (version, valid, infos) =
            block_on(async { decode_serve_reply!(&mut r, .await) }).expect("decode");
        check_serve_reply(ver, version, valid, infos, r.offset(), reply.len());
    }
}

/// Settings stream then the `try` message (docs/hook-protocol.md §1.3, §1.4).
macro_rules! decode_hook_stdin {
    ($r:expr, $($aw:tt)*) => {{
        let r = $r;
        let settings = r.read_settings(200, MAX_STR)$($aw)*?;
        r.expect_str("try")$($aw)*?;
        let am_willing = r.read_bool()$($aw)*?;
        let system = r.read_string(MAX_STR)$($aw)*?;
        let drv = r.read_string(MAX_STR)$($aw)*?;
        let features = r.read_strings(MAX_PATHS, MAX_STR)$($aw)*?;
        Result::<_, WireError>::Ok((settings, am_willing, system, drv, features))
    }};
}

type HookStdin = (Vec<(String, String)>, bool, String, String, Vec<String>);

fn check_hook_stdin(ver: &str, got: HookStdin, offset: u64) {
    let bytes = golden_in(ver, "hook-stdin.bin");
    let hook_expected = |key: &str| hook_expected(ver, key);
    let (settings, am_willing, system, drv, features) = got;
    // Nix sends every setting, sorted by name: 91 in 2.8, more later.
    if ver.is_empty() {
        assert_eq!(settings.len(), 91);
    } else {
        assert!(settings.len() > 91, "{ver}: {}", settings.len());
    }
    assert!(
        settings.windows(2).all(|w| w[0].0 < w[1].0),
        "kept in stream order"
    );
    let get = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    for key in ["build-hook", "builders", "system-features"] {
        assert_eq!(get(key), Some(hook_expected(key).as_str()), "{key}");
    }
    // Nix 2.34 sends the `store` setting rendered as a store reference, `local://?root=…`
    // for the `local?root=…` it was given (2.8 and 2.26 send it as given):
    // https://github.com/NixOS/nix/blob/2.34.0/src/libstore/store-reference.cc
    let store = get("store").map(|s| s.replacen("local://", "local", 1));
    assert_eq!(store, Some(hook_expected("store")), "{ver}");
    assert_eq!(
        get("store").is_some_and(|s| s.starts_with("local://")),
        ver == "nix-2.34",
        "{ver}"
    );
    assert_eq!(get("max-jobs"), Some("1"));
    assert!(am_willing, "max-jobs = 1 leaves a local slot");
    assert_eq!(system, hook_expected("system"));
    assert_eq!(drv, hook_expected("drv"));
    assert_eq!(features, ["ferry-wire"]);
    assert_eq!(
        offset,
        bytes.len() as u64,
        "Nix sent nothing else before the decline"
    );

    // Re-encoding gives Nix's bytes back.
    let mut w = WireWriter::new(Vec::new());
    w.write_settings(&settings).expect("settings");
    w.write_str("try").expect("try");
    w.write_bool(am_willing).expect("amWilling");
    w.write_str(&system).expect("system");
    w.write_str(&drv).expect("drv");
    w.write_strings(&features).expect("features");
    assert_eq!(w.into_inner(), bytes);
}

#[test]
fn hook_stdin_decodes_sync() {
    for ver in VERSIONS {
        let bytes = golden_in(ver, "hook-stdin.bin");
        let mut r = WireReader::new(&bytes[..]);
        let got = (|| decode_hook_stdin!(&mut r,))().expect("decode");
        check_hook_stdin(ver, got, r.offset());
    }
}

#[test]
fn hook_stdin_decodes_async() {
    for ver in VERSIONS {
        let bytes = golden_in(ver, "hook-stdin.bin");
        let mut r = AsyncWireReader::new(&bytes[..]);
        let got = block_on(async { decode_hook_stdin!(&mut r, .await) }).expect("decode");
        check_hook_stdin(ver, got, r.offset());
    }
}

#[test]
fn hook_settings_bounds_on_real_bytes() {
    let bytes = golden("hook-stdin.bin");
    let all = WireReader::new(&bytes[..])
        .read_settings(200, MAX_STR)
        .expect("decode");
    // The 91st setting's tag sits right after the first 90 settings.
    let mut w = WireWriter::new(Vec::new());
    w.write_settings(&all[..90]).expect("encode");
    let at = w.into_inner().len() as u64 - 8;
    let e = WireReader::new(&bytes[..])
        .read_settings(90, MAX_STR)
        .expect_err("limit");
    assert!(
        matches!(e, WireError::TooManySettings { offset, limit: 90 } if offset == at),
        "{e:?}"
    );
    let e =
        block_on(AsyncWireReader::new(&bytes[..]).read_settings(90, MAX_STR)).expect_err("limit");
    assert!(
        matches!(e, WireError::TooManySettings { offset, limit: 90 } if offset == at),
        "{e:?}"
    );

    // The first name, "accept-flake-config", starts after the first tag.
    let e = WireReader::new(&bytes[..])
        .read_settings(200, 8)
        .expect_err("long name");
    assert!(
        matches!(
            e,
            WireError::TooLong {
                offset: 8,
                len: 19,
                limit: 8
            }
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------- malformed input

fn u64s(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[derive(Clone, Copy, Debug)]
enum Op {
    U64,
    Bool,
    Bytes(u64),
    Str(u64),
    Strings(usize, u64),
    Settings(usize, u64),
}

macro_rules! run_op {
    ($r:expr, $op:expr, $($aw:tt)*) => {{
        let r = $r;
        match $op {
            Op::U64 => r.read_u64()$($aw)*.map(drop),
            Op::Bool => r.read_bool()$($aw)*.map(drop),
            Op::Bytes(l) => r.read_bytes(l)$($aw)*.map(drop),
            Op::Str(l) => r.read_string(l)$($aw)*.map(drop),
            Op::Strings(n, l) => r.read_strings(n, l)$($aw)*.map(drop),
            Op::Settings(n, l) => r.read_settings(n, l)$($aw)*.map(drop),
        }
    }};
}

/// Runs `op` on `input` through both readers; they must fail the same way. Returns the error
/// for the caller to match, after checking its message contains `msg`.
fn fail(input: &[u8], op: Op, msg: &str) -> WireError {
    let sync = run_op!(&mut WireReader::new(input), op,).expect_err("sync must fail");
    let asy = block_on(async { run_op!(&mut AsyncWireReader::new(input), op, .await) })
        .expect_err("async must fail");
    assert_eq!(
        sync.to_string(),
        asy.to_string(),
        "sync and async agree for {op:?}"
    );
    assert!(
        sync.to_string().contains(msg),
        "{op:?}: {sync} lacks {msg:?}"
    );
    sync
}

#[test]
fn truncated_integer() {
    let e = fail(
        &[1, 2, 3, 4, 5],
        Op::U64,
        "unexpected end of input at byte offset 5 (wanted 3 more",
    );
    assert!(matches!(
        e,
        WireError::Eof {
            offset: 5,
            wanted: 3
        }
    ));
    let e = fail(&[], Op::Strings(9, 9), "byte offset 0 (wanted 8");
    assert!(matches!(
        e,
        WireError::Eof {
            offset: 0,
            wanted: 8
        }
    ));
}

#[test]
fn truncated_string_body_and_padding() {
    let e = fail(
        &cat(&[&u64s(&[10]), b"abcd"]),
        Op::Bytes(64),
        "byte offset 12 (wanted 6",
    );
    assert!(matches!(
        e,
        WireError::Eof {
            offset: 12,
            wanted: 6
        }
    ));
    let e = fail(
        &cat(&[&u64s(&[3]), b"abc\0\0"]),
        Op::Str(64),
        "byte offset 13 (wanted 3",
    );
    assert!(matches!(
        e,
        WireError::Eof {
            offset: 13,
            wanted: 3
        }
    ));
}

#[test]
fn string_over_limit_fails_before_allocating() {
    // 2^60 bytes could never be allocated: the limit check must come first.
    let input = cat(&[&u64s(&[1 << 60]), b"abc"]);
    let e = fail(
        &input,
        Op::Bytes(16),
        "is 1152921504606846976 bytes long, the limit here is 16",
    );
    assert!(matches!(
        e,
        WireError::TooLong {
            offset: 0,
            len: 0x1000_0000_0000_0000,
            limit: 16
        }
    ));
    // Even with no effective limit, the buffer grows only as bytes arrive.
    let e = fail(&input, Op::Bytes(u64::MAX), "byte offset 11");
    assert!(matches!(e, WireError::Eof { offset: 11, .. }));
    // In a list, the offset is the item's.
    let input = cat(&[&u64s(&[2, 1]), b"a\0\0\0\0\0\0\0", &u64s(&[40])]);
    let e = fail(
        &input,
        Op::Strings(4, 32),
        "string at byte offset 24 is 40 bytes long",
    );
    assert!(matches!(
        e,
        WireError::TooLong {
            offset: 24,
            len: 40,
            limit: 32
        }
    ));
}

#[test]
fn non_zero_padding() {
    let input = cat(&[&u64s(&[3]), b"abc\0\0\x01\0\0"]);
    let e = fail(
        &input,
        Op::Str(64),
        "non-zero padding byte after the string at byte offset 11",
    );
    assert!(matches!(e, WireError::BadPadding { offset: 11 }));
}

#[test]
fn invalid_utf8() {
    let input = cat(&[
        &u64s(&[2, 2]),
        b"ok\0\0\0\0\0\0",
        &u64s(&[2]),
        b"\xff\xfe\0\0\0\0\0\0",
    ]);
    let e = fail(
        &input,
        Op::Strings(4, 64),
        "string at byte offset 24 is not valid UTF-8",
    );
    assert!(matches!(e, WireError::NotUtf8 { offset: 24 }));
    // The same bytes are fine as raw bytes.
    let raw = cat(&[&u64s(&[2]), b"\xff\xfe\0\0\0\0\0\0"]);
    assert_eq!(
        WireReader::new(&raw[..]).read_bytes(8).expect("bytes"),
        b"\xff\xfe"
    );
}

#[test]
fn too_many_list_items() {
    let e = fail(
        &u64s(&[5]),
        Op::Strings(4, 64),
        "list at byte offset 0 has 5 items, the limit here is 4",
    );
    assert!(matches!(
        e,
        WireError::TooManyItems {
            offset: 0,
            len: 5,
            limit: 4
        }
    ));
    // A huge count is refused before any capacity is reserved.
    let e = fail(
        &u64s(&[1 << 62]),
        Op::Strings(usize::MAX, 64),
        "byte offset 8",
    );
    assert!(matches!(e, WireError::Eof { offset: 8, .. }), "{e:?}");
}

#[test]
fn bad_bool() {
    let e = fail(
        &u64s(&[2]),
        Op::Bool,
        "value 2 at byte offset 0 does not fit in bool",
    );
    assert!(matches!(
        e,
        WireError::Overflow {
            offset: 0,
            value: 2,
            target: "bool"
        }
    ));
}

/// One encoded setting: tag, name, value; 40 bytes for names and values of up to 8 bytes.
fn setting(name: &str, value: &str) -> Vec<u8> {
    let mut w = WireWriter::new(u64s(&[1]));
    w.write_str(name).expect("name");
    w.write_str(value).expect("value");
    w.into_inner()
}

#[test]
fn bad_settings_tag() {
    let input = cat(&[&setting("cores", "4"), &u64s(&[2])]);
    let e = fail(
        &input,
        Op::Settings(10, 64),
        "tag at byte offset 40 is 2, expected 1",
    );
    assert!(matches!(
        e,
        WireError::BadSettingsTag { offset: 40, tag: 2 }
    ));
}

#[test]
fn settings_bounds_and_truncation() {
    let input = cat(&[&setting("a", "1"), &setting("b", "2"), &u64s(&[0])]);
    let e = fail(
        &input,
        Op::Settings(1, 64),
        "more than 1 settings (the one at byte offset 40)",
    );
    assert!(matches!(
        e,
        WireError::TooManySettings {
            offset: 40,
            limit: 1
        }
    ));
    let e = fail(
        &cat(&[&setting("name", "a long value")]),
        Op::Settings(9, 8),
        "offset 24 is 12 bytes",
    );
    assert!(matches!(
        e,
        WireError::TooLong {
            offset: 24,
            len: 12,
            limit: 8
        }
    ));
    // The stream must end with a 0 tag.
    let e = fail(
        &setting("a", "1"),
        Op::Settings(9, 64),
        "byte offset 40 (wanted 8",
    );
    assert!(matches!(
        e,
        WireError::Eof {
            offset: 40,
            wanted: 8
        }
    ));
    let ok = WireReader::new(&input[..])
        .read_settings(2, 1)
        .expect("exactly at the bounds");
    assert_eq!(ok, [("a".into(), "1".into()), ("b".into(), "2".into())]);
}

#[path = "wire/round_trips.rs"]
mod round_trips;
