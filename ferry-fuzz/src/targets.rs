//! The fuzz targets: one function per parser or protocol reader, each `fn(&[u8]) -> bool`
//! (true when the input was accepted, which the stable runner uses to keep it for further
//! mutation; cargo-fuzz ignores it). A target panics on any broken invariant: besides "no
//! panic", most check that what they parsed renders and parses back the same.

use ferry_nix::nixconf::FileLoader;
use ferry_nix::store_path::StoreDir;
use std::borrow::Cow;
use std::io;
use std::path::Path;

fn store() -> StoreDir {
    StoreDir::new("/nix/store").expect("store dir")
}

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Files for `include` and `@file` targets: the input is the main text, then files each
/// after a `\n=== <absolute path>\n` header. Nothing else exists.
pub struct VirtualFs {
    pub main: String,
    pub files: Vec<(String, String)>,
}

pub const FILE_HEADER: &str = "\n=== ";

impl VirtualFs {
    pub fn parse(input: &str) -> VirtualFs {
        let mut parts = input.split(FILE_HEADER);
        let main = parts.next().unwrap_or_default().to_owned();
        let files = parts
            .map(|p| {
                let (name, body) = p.split_once('\n').unwrap_or((p, ""));
                (name.to_owned(), body.to_owned())
            })
            .collect();
        VirtualFs { main, files }
    }

    pub fn render(main: &str, files: &[(String, String)]) -> String {
        let mut s = main.to_owned();
        for (name, body) in files {
            s.push_str(FILE_HEADER);
            s.push_str(name);
            s.push('\n');
            s.push_str(body);
        }
        s
    }
}

impl FileLoader for VirtualFs {
    fn load(&self, path: &Path) -> io::Result<Option<String>> {
        let p = path.to_string_lossy();
        if p.ends_with("unreadable") {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        }
        Ok(self
            .files
            .iter()
            .find(|(n, _)| *n == p)
            .map(|(_, b)| b.clone()))
    }
}

fn runtime<T>(f: impl std::future::Future<Output = T>) -> T {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

// ---------------------------------------------------------------- NAR

/// Re-encodes what it is shown, so a parsed NAR can be compared with its bytes.
struct Reencode {
    enc: Option<ferry_nix::nar::NarEncoder<Vec<u8>>>,
}

impl Reencode {
    fn new() -> Reencode {
        Reencode {
            enc: Some(ferry_nix::nar::NarEncoder::new(Vec::new()).expect("encoder")),
        }
    }
    fn enc(&mut self, path: &[u8]) -> io::Result<&mut ferry_nix::nar::NarEncoder<Vec<u8>>> {
        let enc = self.enc.as_mut().expect("encoder");
        if !path.is_empty() {
            let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
            enc.entry(name).map_err(io::Error::other)?;
        }
        Ok(enc)
    }
}

impl ferry_nix::nar::NarVisitor for Reencode {
    fn directory(&mut self, path: &[u8]) -> io::Result<()> {
        self.enc(path)?.begin_directory().map_err(io::Error::other)
    }
    fn end_directory(&mut self, _: &[u8]) -> io::Result<()> {
        self.enc(b"")?.end_directory().map_err(io::Error::other)
    }
    fn regular(
        &mut self,
        path: &[u8],
        executable: bool,
        contents: &mut ferry_nix::nar::NarContents<'_>,
    ) -> io::Result<()> {
        let mut data = Vec::new();
        io::Read::read_to_end(contents, &mut data)?;
        self.enc(path)?
            .regular_bytes(executable, &data)
            .map_err(io::Error::other)
    }
    fn symlink(&mut self, path: &[u8], target: &[u8]) -> io::Result<()> {
        self.enc(path)?.symlink(target).map_err(io::Error::other)
    }
}

/// NAR parsing (`ferry_nix::nar::parse`, `validate`): an accepted NAR re-encodes to its bytes.
pub fn nar_parse(data: &[u8]) -> bool {
    let valid = ferry_nix::nar::validate(data);
    let mut v = Reencode::new();
    let parsed = ferry_nix::nar::parse(data, &mut v);
    match (parsed, valid) {
        (Ok(n), Ok(m)) => {
            assert_eq!(n, m);
            assert_eq!(n, data.len() as u64, "exactly one NAR, no trailing bytes");
            let (bytes, size) = v.enc.take().expect("encoder").finish().expect("finish");
            assert_eq!(size, n);
            assert!(bytes == data, "a parsed NAR re-encodes to the same bytes");
            true
        }
        (Err(_), Err(_)) => false,
        (p, v) => panic!("parse and validate disagree: {p:?} vs {v:?}"),
    }
}

struct RestoreDir {
    _dir: tempfile::TempDir,
    base: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// NAR restore (`ferry_nix::nar::restore`) into a temporary directory: nothing is written
/// outside the target (a sibling canary directory, which symlinks in the NAR may name, stays
/// as it was), nothing is left beside it, a failed restore leaves no target, and a restored
/// tree dumps back to the NAR's bytes.
pub fn nar_restore(data: &[u8]) -> bool {
    thread_local! {
        static DIR: RestoreDir = {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = dir.path().join("b");
            let outside = dir.path().join("outside");
            std::fs::create_dir(&base).expect("mkdir");
            std::fs::create_dir(&outside).expect("mkdir");
            std::fs::write(outside.join("canary"), b"canary").expect("canary");
            // So a NAR symlink `../outside` from the target's parent's level points somewhere.
            std::os::unix::fs::symlink(&outside, base.join("outside")).expect("symlink");
            RestoreDir { _dir: dir, base, outside }
        };
    }
    DIR.with(|d| {
        let target = d.base.join("out");
        let result = ferry_nix::nar::restore(data, &target);
        assert_eq!(listing(&d.outside), ["canary"], "wrote outside the target");
        assert_eq!(
            std::fs::read(d.outside.join("canary")).expect("canary"),
            b"canary"
        );
        match result {
            Ok(n) => {
                assert_eq!(n, data.len() as u64);
                assert_eq!(
                    listing(&d.base),
                    ["out", "outside"],
                    "left something beside"
                );
                let mut dumped = Vec::new();
                ferry_nix::nar::dump_path(&target, &mut dumped).expect("dump");
                assert!(
                    dumped == data,
                    "a restored tree dumps to the NAR it came from"
                );
                let md = std::fs::symlink_metadata(&target).expect("target");
                if md.is_dir() {
                    make_writable(&target);
                    std::fs::remove_dir_all(&target).expect("clean");
                } else {
                    std::fs::remove_file(&target).expect("clean");
                }
                true
            }
            Err(_) => {
                assert_eq!(listing(&d.base), ["outside"], "a failed restore left files");
                false
            }
        }
    })
}

/// Restored directories may be read-only; `remove_dir_all` needs to write them.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            make_writable(&e.path());
        }
    }
}

// ---------------------------------------------------------------- narinfo

const KEY1_PUB: &str = include_str!("../../ferry-nix/tests/golden/narinfo/ferry-test-1.pub");
const KEY2_PUB: &str = include_str!("../../ferry-nix/tests/golden/narinfo/ferry-test-2.pub");

fn trusted_keys() -> ferry_nix::signing::TrustedKeys {
    let list = format!("{} {}", KEY1_PUB.trim(), KEY2_PUB.trim());
    ferry_nix::signing::TrustedKeys::parse_list(&list).expect("golden keys")
}

/// narinfo and nix-cache-info parsing: what parses renders and parses back equal.
pub fn narinfo(data: &[u8]) -> bool {
    use ferry_nix::narinfo::{CacheInfo, NarInfo};
    let dir = store();
    let t = text(data);
    if let Ok(ci) = CacheInfo::parse(&t) {
        let again = CacheInfo::parse(&ci.render()).expect("rendered nix-cache-info parses");
        assert_eq!(again, ci);
    }
    let Ok(info) = NarInfo::parse(&dir, &t) else {
        return false;
    };
    let rendered = info.render(&dir);
    let again = NarInfo::parse(&dir, &rendered).expect("a rendered narinfo parses");
    assert_eq!(again, info, "render/parse round trip\n{rendered}");
    // Signatures are checked in `substituter_check` (slow in debug builds).
    let _ = info.fingerprint(&dir);
    true
}

/// The substituter's check of an upstream narinfo (`check_narinfo`), with and without
/// signatures required, relative and absolute upstreams; keys it routes NARs by are safe.
pub fn substituter_check(data: &[u8]) -> bool {
    use ferry_substituter::check::check_narinfo;
    use ferry_substituter::paths::is_safe_key;
    let dir = store();
    // Ask for the path the narinfo names, so the check goes past the hash part.
    let t = text(data);
    let hash_part = t
        .find("StorePath: /nix/store/")
        .and_then(|i| t.get(i + 22..i + 22 + 32))
        .unwrap_or("00000000000000000000000000000000");
    let keys = trusted_keys();
    let mut any = false;
    for (require, base) in [
        (true, None),
        (false, Some("http://cache.example:5000/sub")),
        (true, Some("https://cache.example")),
    ] {
        if let Ok(c) = check_narinfo(&dir, hash_part, data, &keys, require, base) {
            any = true;
            if let Some(k) = &c.nar_key {
                assert!(is_safe_key(k), "routes by an unsafe key {k:?}");
            }
            if !require {
                assert!(c.trusted);
            }
            // The body served is a narinfo of the same path.
            let served = ferry_nix::narinfo::NarInfo::parse(&dir, &c.body).expect("served body");
            assert_eq!(served.store_path.hash_part(), hash_part);
        }
    }
    any
}

// ---------------------------------------------------------------- derivations

/// `.drv` ATerm parsing: what parses renders and parses back equal, and encodes for the wire.
pub fn derivation(data: &[u8]) -> bool {
    use ferry_nix::derivation::Derivation;
    let dir = store();
    let Ok(drv) = Derivation::parse(data, &dir) else {
        return false;
    };
    let rendered = drv.render(&dir);
    let again = Derivation::parse(rendered.as_bytes(), &dir).expect("a rendered drv parses");
    assert_eq!(again, drv);
    let _ = drv.to_basic().to_wire(&dir);
    true
}

// ---------------------------------------------------------------- configuration

/// Machines files (`parse_machines`, `@file` entries from a virtual file system): every
/// machine renders as a line that parses back to it.
pub fn machines(data: &[u8]) -> bool {
    use ferry_nix::machines::parse_machines;
    let fs = VirtualFs::parse(&text(data));
    let Ok(ms) = parse_machines(&fs.main, "/etc/nix/machines", "x86_64-linux", &fs) else {
        return false;
    };
    for m in &ms {
        let line = m.to_line();
        let back = parse_machines(&line, "line", "x86_64-linux", &fs).expect("to_line parses");
        assert_eq!(back.len(), 1, "{line:?}");
        assert_eq!(back[0], *m, "{line:?}");
        let _ = m.slot_lock_name(1);
        let _ = m.host();
    }
    true
}

/// nix.conf with includes (virtual file system, `NIX_CONFIG` after it when a file of that
/// name is given), and every typed getter over every setting.
pub fn nixconf(data: &[u8]) -> bool {
    use ferry_nix::nixconf::{NIX_CONFIG_SOURCE, NixConf};
    let fs = VirtualFs::parse(&text(data));
    let Ok(mut conf) = NixConf::parse(&fs.main, Path::new("/etc/nix/nix.conf"), &fs) else {
        return false;
    };
    if let Some((_, env)) = fs.files.iter().find(|(n, _)| n == NIX_CONFIG_SOURCE) {
        let _ = conf.apply_text(env, Path::new(NIX_CONFIG_SOURCE), &fs);
    }
    let names: Vec<String> = conf.iter().map(|(n, _)| n.to_owned()).collect();
    for n in &names {
        let _ = conf.get(n);
        let _ = conf.get_bool(n);
        let _ = conf.get_u64(n);
        let _ = conf.get_list(n);
        let _ = conf.get_set(n);
        let _ = conf.provenance(n);
    }
    let _ = conf.get_max_jobs(2);
    true
}

// ---------------------------------------------------------------- wire and hook protocol

/// The wire readers: the synchronous and the asynchronous reader agree on every value and
/// error for the same bytes.
pub fn wire(data: &[u8]) -> bool {
    use ferry_nix::wire::{AsyncWireReader, WireReader};
    let (&script, rest) = data.split_first().unwrap_or((&0, &[]));
    let mut s = WireReader::new(rest);
    let mut a = AsyncWireReader::new(rest);
    let mut ok = true;
    for step in 0..8u32 {
        let op = (u32::from(script) >> step) & 3 | ((step & 1) << 2);
        let (x, y) = match op {
            0 => (
                format!("{:?}", s.read_settings(64, 4096)),
                format!("{:?}", runtime(a.read_settings(64, 4096))),
            ),
            1 => (
                format!("{:?}", s.read_strings(1024, 4096)),
                format!("{:?}", runtime(a.read_strings(1024, 4096))),
            ),
            2 => (
                format!("{:?}", s.read_bool()),
                format!("{:?}", runtime(a.read_bool())),
            ),
            3 => (
                format!("{:?}", s.expect_str("try")),
                format!("{:?}", runtime(a.expect_str("try"))),
            ),
            4 => (
                format!("{:?}", s.read_string(64)),
                format!("{:?}", runtime(a.read_string(64))),
            ),
            5 => (
                format!("{:?}", s.read_bytes(1 << 20)),
                format!("{:?}", runtime(a.read_bytes(1 << 20))),
            ),
            _ => (
                format!("{:?}", s.read_u64()),
                format!("{:?}", runtime(a.read_u64())),
            ),
        };
        assert_eq!(x, y, "sync and async readers disagree at step {step}");
        assert_eq!(s.offset(), a.offset());
        if x.starts_with("Err") {
            ok = false;
            break;
        }
    }
    ok
}

/// What the daemon writes to the hook's stdin (hook/src/protocol.rs): the settings stream,
/// layered on nix.conf as the hook does (with the `builders` value parsed as machines), then
/// `try` requests, each followed by the inputs and wanted outputs of an accepted job.
pub fn hook_protocol(data: &[u8]) -> bool {
    use ferry_build_hook::protocol::{Request, read_accepted, read_request, read_settings};
    use ferry_nix::wire::AsyncWireReader;
    runtime(async {
        let mut r = AsyncWireReader::new(data);
        let Ok(settings) = read_settings(&mut r).await else {
            return false;
        };
        let mut conf = ferry_nix::nixconf::NixConf::new();
        conf.apply_overrides(&settings);
        if let Some(b) = conf.get("builders") {
            let none = |_: &Path| -> io::Result<Option<String>> { Ok(None) };
            let _ = ferry_nix::machines::parse_machines(b, "builders", "x86_64-linux", &none);
        }
        for _ in 0..16 {
            match read_request(&mut r).await {
                Ok(Request::Try(_)) => {
                    if read_accepted(&mut r).await.is_err() {
                        return true;
                    }
                }
                Ok(Request::Done) | Err(_) => return true,
            }
        }
        true
    })
}

/// The hook's argv (lines or NUL-separated) and what it writes back: a reply is exactly its
/// lines, an `@nix` log line is one line of JSON that gives the text back.
pub fn hook_args_replies(data: &[u8]) -> bool {
    use ferry_build_hook::protocol::{NixLog, Reply, Verbosity, parse_args};
    let t = text(data);
    let argv: Vec<String> = t.split(['\n', '\0']).map(str::to_owned).collect();
    let ok = match parse_args(&argv) {
        Ok(v) => {
            assert!(v.0 <= 7);
            true
        }
        Err(_) => false,
    };
    let accept = Reply::Accept(t.clone().into_owned()).render();
    assert!(accept.starts_with("# accept\n") && accept.ends_with('\n'));
    assert_eq!(accept.matches('\n').count(), 2, "{accept:?}");
    let log = NixLog::Msg {
        level: Verbosity::INFO,
        msg: t.clone().into_owned(),
    }
    .render();
    let json = log
        .strip_prefix("@nix ")
        .and_then(|l| l.strip_suffix('\n'))
        .expect("@nix line");
    assert!(!json.contains('\n'));
    let v: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
    assert_eq!(v["msg"].as_str(), Some(&*t));
    ok
}

// ---------------------------------------------------------------- serve protocol client

const SERVE_REQUESTED: [&str; 3] = [
    "hfv8m9zs7zqlqq8ybh49yx19zfh95fwc-hello.txt",
    "pci9hq6r0sb60ls8nq6867hdn4akb335-wire-golden",
    "00000000000000000000000000000000-ferry-missing",
];
const SIMPLE_DRV: &[u8] = include_bytes!("../../ferry-nix/tests/golden/derivation/simple.drv");
const FILE_NAR: &[u8] = include_bytes!("../../ferry-nix/tests/golden/nar/file.nar");

/// The serve client (ferry-nix/src/serve/) reading a builder's bytes: the first input byte
/// picks the first operation, the rest is everything the remote writes, handshake included.
/// Operations follow each other in a fixed rotation while they succeed.
pub fn serve_client(data: &[u8]) -> bool {
    use ferry_nix::serve::{BuildOptions, PathInfo, ServeClient};
    use ferry_nix::store_path::StorePath;
    use std::collections::BTreeSet;
    let (&first, rest) = data.split_first().unwrap_or((&0, &[]));
    let paths: BTreeSet<StorePath> = SERVE_REQUESTED
        .iter()
        .map(|b| StorePath::from_base_name(b).expect("golden path"))
        .collect();
    let dir = store();
    let drv = ferry_nix::derivation::Derivation::parse(SIMPLE_DRV, &dir).expect("golden drv");
    let drv_path = StorePath::from_base_name("4id9fvxwrbwj7yw3rsvajsg616nk0nid-wire-golden.drv")
        .expect("drv path");
    let any = paths.iter().next().expect("a path").clone();
    runtime(async {
        let Ok(mut c) = ServeClient::handshake(rest, tokio::io::sink(), dir.clone(), "fuzz").await
        else {
            return false;
        };
        let mut op = first % 6;
        for _ in 0..6 {
            let ok = match op {
                0 => c.query_valid_paths(true, false, &paths).await.is_ok(),
                1 => c.query_path_infos(&paths).await.is_ok(),
                2 => c.query_closure(true, &paths).await.is_ok(),
                3 => c
                    .build_derivation(&drv_path, &drv.to_basic(), &BuildOptions::default())
                    .await
                    .is_ok(),
                4 => c.dump_store_path(&any, tokio::io::sink()).await.is_ok(),
                _ => {
                    let info = PathInfo {
                        path: any.clone(),
                        deriver: None,
                        references: BTreeSet::new(),
                        nar_size: FILE_NAR.len() as u64,
                        nar_hash: ferry_nix::hash::Hash::sha256_of(FILE_NAR),
                        ca: None,
                        sigs: BTreeSet::new(),
                    };
                    c.add_to_store_nar(&info, FILE_NAR).await.is_ok()
                }
            };
            if !ok {
                break;
            }
            op = (op + 1) % 6;
        }
        true
    })
}

// ---------------------------------------------------------------- substituter and uploader

/// The substituter's request paths (substituter/src/paths.rs): a safe key never leaves a
/// `file://` cache directory or an upstream's base, and routes are safe keys.
pub fn substituter_paths(data: &[u8]) -> bool {
    use ferry_substituter::paths::{
        HashPart, NarRoute, Request, classify, file_path, http_url, is_safe_key, nar_route,
        rewrite_url_line,
    };
    use std::path::Component;
    let t = text(data);
    let req = classify(&t);
    if let Request::NarInfo(h) = &req {
        assert_eq!(
            HashPart::parse(h.as_str()).map(|x| x.as_str().to_owned()),
            Some(h.as_str().to_owned())
        );
    }
    let key = t.strip_prefix('/').unwrap_or(&t);
    let safe = is_safe_key(key);
    let dir = Path::new("/srv/cache");
    if safe {
        let p = file_path(dir, key);
        assert!(p.starts_with(dir), "{p:?}");
        assert!(
            p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
            "{p:?}"
        );
    }
    for base_text in [
        "http://u:p@cache.example:8080/base",
        "https://cache.example",
    ] {
        let base = reqwest::Url::parse(base_text).expect("base");
        if let Some(url) = http_url(&base, base_text, key) {
            assert!(safe);
            let under = format!("{}/", base.path().trim_end_matches('/'));
            assert!(url.path().starts_with(&under), "{url} not under {base}");
            assert_eq!(url.host(), base.host());
            assert_eq!(url.port_or_known_default(), base.port_or_known_default());
            assert!(!url.path().contains("/../") && !url.path().contains("/./"));
        }
        match nar_route(&t, Some(base_text)) {
            NarRoute::Relative { key, .. } => assert!(is_safe_key(&key), "{key:?}"),
            NarRoute::Absolute => {}
        }
    }
    if let NarRoute::Relative { key, .. } = nar_route(&t, None) {
        assert!(is_safe_key(&key));
    }
    let rewritten = rewrite_url_line(&t, "nar/x.nar");
    assert_eq!(rewritten.lines().count(), t.lines().count());
    safe
}

/// `Retry-After` values (substituter/src/retry_after.rs), at several clocks.
pub fn retry_after(data: &[u8]) -> bool {
    use ferry_substituter::retry_after::{http_date, parse};
    use std::time::{Duration, UNIX_EPOCH};
    let t = text(data);
    let mut ok = false;
    for now in [0, 1_700_000_000, u64::from(u32::MAX) * 4] {
        if let Some(d) = parse(&t, UNIX_EPOCH + Duration::from_secs(now)) {
            ok = true;
            if let Ok(s) = t.trim().parse::<u64>() {
                assert_eq!(d, Duration::from_secs(s));
            }
        }
    }
    let _ = http_date(&t);
    ok
}

/// Upload target URLs (post-build/src/target.rs `parse_url`).
pub fn target_url(data: &[u8]) -> bool {
    use ferry_post_build::target::{TargetUrl, parse_url};
    let Ok(p) = parse_url(&text(data)) else {
        return false;
    };
    match p.location {
        TargetUrl::Http(u) => assert!(!u.ends_with('/')),
        TargetUrl::File(p) => assert!(p.is_absolute()),
        TargetUrl::S3(_) => {}
    }
    true
}

/// Spool records (post-build/src/spool.rs): a decoded record encodes and decodes back equal.
pub fn spool(data: &[u8]) -> bool {
    use ferry_post_build::spool::SpoolRecord;
    let Ok(rec) = SpoolRecord::decode(&text(data)) else {
        return false;
    };
    let enc = rec.encode().expect("a decoded record encodes");
    assert_eq!(SpoolRecord::decode(&enc), Ok(rec));
    true
}

// ---------------------------------------------------------------- keys, paths, hashes

/// Signing keys, signatures and trusted-key lists (ferry-nix/src/signing.rs), line by line:
/// each renders and parses back equal; a secret key's signature verifies with its public key.
pub fn signing(data: &[u8]) -> bool {
    use ferry_nix::signing::{PublicKey, SecretKey, Signature, TrustedKeys};
    let t = text(data);
    let mut ok = TrustedKeys::parse_list(&t).is_ok();
    for line in t.lines() {
        if let Ok(s) = Signature::parse(line) {
            ok = true;
            assert_eq!(Signature::parse(&s.to_string()).expect("sig"), s);
        }
        if let Ok(k) = PublicKey::parse(line) {
            ok = true;
            assert_eq!(PublicKey::parse(&k.to_string()).expect("key"), k);
        }
        if let Ok(k) = SecretKey::parse(line) {
            ok = true;
            let again = SecretKey::parse(&k.to_key_file_text()).expect("secret key");
            assert_eq!(again.to_public(), k.to_public());
            let sig = k.sign(data);
            assert!(k.to_public().verify(data, &sig));
        }
    }
    ok
}

/// Store directories and paths (ferry-nix/src/store_path.rs): the first line is a store
/// directory, every other line a path in it (or a base name); what parses displays back.
pub fn store_path(data: &[u8]) -> bool {
    use ferry_nix::store_path::StorePath;
    let t = text(data);
    let mut lines = t.lines();
    let dir = StoreDir::new(lines.next().unwrap_or_default()).unwrap_or_else(|_| store());
    let mut ok = false;
    for line in lines {
        if let Ok(p) = dir.parse(line) {
            ok = true;
            assert_eq!(dir.parse(&dir.display(&p)).expect("display parses"), p);
            let again = StorePath::from_parts(*p.digest(), p.name()).expect("from_parts");
            assert_eq!(again, p);
        }
        if let Ok((p, sub)) = dir.parse_with_subpath(line) {
            ok = true;
            assert_eq!(format!("{}{sub}", dir.display(&p)), line);
        }
        if let Ok(p) = StorePath::from_base_name(line) {
            ok = true;
            assert_eq!(p.as_str(), line);
            let _ = p.is_derivation();
        }
    }
    ok
}

/// Hashes (ferry-nix/src/hash.rs), line by line, also with the algorithm given apart: each
/// parsed hash renders in every encoding that parses back to it.
pub fn hash(data: &[u8]) -> bool {
    use ferry_nix::hash::{Hash, HashAlgo, nix32_decode, nix32_encode};
    let t = text(data);
    let mut ok = false;
    let check = |h: &Hash| {
        for s in [
            h.to_nix32_prefixed(),
            h.to_sri(),
            format!("{}:{}", h.algo().name(), h.to_base16()),
        ] {
            assert_eq!(Hash::parse_any_prefixed(&s).as_ref(), Ok(h), "{s}");
        }
    };
    for line in t.lines() {
        if let Ok(h) = Hash::parse_any_prefixed(line) {
            ok = true;
            check(&h);
        }
        for algo in [HashAlgo::Sha256, HashAlgo::Sha512] {
            if let Ok(h) = Hash::parse_non_sri_unprefixed(line, algo) {
                ok = true;
                check(&h);
            }
        }
        for size in [20, 32] {
            if let Ok(b) = nix32_decode(line, size) {
                ok = true;
                assert_eq!(nix32_encode(&b), line);
            }
        }
    }
    ok
}
