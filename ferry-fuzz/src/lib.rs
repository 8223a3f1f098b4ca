//! Fuzz targets for every Ferry parser and protocol reader ([`targets`]), their seeds (the
//! golden files Nix 2.8, 2.26 and 2.34 wrote, plus hand-made and regression seeds), and a
//! deterministic stable-Rust mutation runner ([`runner`]) that fails on a panic, a hang or
//! an allocation beyond a bound. The same target functions back the `cargo fuzz` targets in
//! `fuzz/` (fuzz/README.md).

pub mod alloc;
pub mod mutate;
pub mod runner;
pub mod targets;

use std::path::{Path, PathBuf};

/// A fuzz target: its function, seeds and dictionary.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> bool,
    pub seeds: fn() -> Vec<Vec<u8>>,
    pub dict: &'static [&'static [u8]],
    /// Longest input the runner makes.
    pub max_len: usize,
}

const NAR_DICT: &[&[u8]] = &[
    b"nix-archive-1",
    b"(",
    b")",
    b"type",
    b"regular",
    b"directory",
    b"symlink",
    b"executable",
    b"",
    b"contents",
    b"entry",
    b"name",
    b"node",
    b"target",
    b"..",
    b".",
    b"a/b",
    b"../outside",
    b"../outside/canary",
    b"outside",
    b"/tmp",
];

const NARINFO_DICT: &[&[u8]] = &[
    b"StorePath: /nix/store/",
    b"URL: ",
    b"Compression: ",
    b"FileHash: sha256:",
    b"FileSize: ",
    b"NarHash: sha256:",
    b"NarSize: ",
    b"References: ",
    b"Deriver: ",
    b"System: ",
    b"Sig: ferry-test-1:",
    b"CA: fixed:r:sha256:",
    b"CA: text:sha256:",
    b"StoreDir: ",
    b"WantMassQuery: ",
    b"Priority: ",
    b"unknown-deriver",
    b"nar/",
    b"http://cache.example:5000/sub/nar/x.nar",
    b"%2e%2e",
    b"../",
    b"\xc3\xa9",
    b"sha512:",
    b"sha256-",
];

const DRV_DICT: &[&[u8]] = &[
    b"Derive(",
    b"DrvWithVersion(",
    b"[",
    b"]",
    b"(\"",
    b"\",\"",
    b"\")",
    b"\\\"",
    b"\\n",
    b"\\\\",
    b"/nix/store/",
    b"r:sha256",
    b"sha256",
    b"text:sha256",
    b"out",
    b"builder",
    b"x86_64-linux",
    b"__structuredAttrs",
];

const CONF_DICT: &[&[u8]] = &[
    b"include ",
    b"!include ",
    b"\n=== /etc/nix/",
    b"\n=== NIX_CONFIG\n",
    b"\n=== /etc/nix/machines\n",
    b"/etc/nix/nix.conf",
    b"conf.d/keys.conf",
    b"../",
    b"builders = ",
    b"extra-",
    b"max-jobs = auto",
    b"= ",
    b" # ",
    b"@/etc/nix/machines",
    b"ssh://",
    b"ssh-ng://",
    b"x86_64-linux,aarch64-linux",
    b" - ",
    b";",
    b"big-parallel,kvm",
    b"c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUxrNQ==",
    b"?remote-store=",
    b"true",
    b"false",
    b"yes",
];

const WIRE_DICT: &[&[u8]] = &[
    b"try",
    b"builders",
    b"max-jobs",
    b"system-features",
    b"x86_64-linux",
    b"/nix/store/hfv8m9zs7zqlqq8ybh49yx19zfh95fwc-hello.txt",
    b"/nix/store/pci9hq6r0sb60ls8nq6867hdn4akb335-wire-golden",
    b"/nix/store/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0i\xc3\xa9x-name",
    b"sha256:03d0bg12y49j6xwgx34wk2gmxvw9ra1fh8zhan6kr05v351r0hhj",
    b"nix-archive-1",
    b"(",
    b")",
    b"type",
    b"regular",
    b"contents",
    b"out",
    b"\xcb\xeeRT\0\0\0\0",
    b"\x07\x02\0\0\0\0\0\0",
];

const PATH_DICT: &[&[u8]] = &[
    b"/nix-cache-info",
    b".narinfo",
    b"/nar/",
    b".nar.xz",
    b"/log/",
    b"/realisations/",
    b"/debuginfo/",
    b".ls",
    b"%2e",
    b"%2E%2e",
    b"%2f",
    b"%5c",
    b"..",
    b"?",
    b"#",
    b"//",
    b"http://cache.example:8080/base/",
    b"https://cache.example/",
    b"file://",
    b"s3://",
    b"0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ix",
];

const TEXT_DICT: &[&[u8]] = &[
    b"Sun, 06 Nov 1994 08:49:37 GMT",
    b"Sunday, 06-Nov-94 08:49:37 GMT",
    b"Sun Nov  6 08:49:37 1994",
    b"Feb",
    b"29",
    b"GMT",
    b"99999999999999999999",
    b"file://",
    b"http://",
    b"https://",
    b"s3://",
    b"?compression=",
    b"&endpoint=",
    b"&region=",
    b"&scheme=",
    b"&profile=",
    b"%",
    b"%2",
    b"+",
    b"zstd",
    b"xz",
    b"none",
    b"ferry-post-build-spool 1\n",
    b"drv /nix/store/",
    b"out /nix/store/",
    b"ferry-test-1:",
    b"cache.nixos.org-1:",
    b"sha256:",
    b"sha512:",
    b"sha256-",
    b"/nix/store/",
    b".drv",
    b"==",
    b"\xc3\xa9",
    b"# accept\n",
    b"\x1b[31m",
];

macro_rules! target {
    ($name:ident, $seeds:expr, $dict:expr, $max:expr) => {
        Target {
            name: stringify!($name),
            run: targets::$name,
            seeds: $seeds,
            dict: $dict,
            max_len: $max,
        }
    };
}

/// Every target, in the order the runner fuzzes them.
pub const TARGETS: &[Target] = &[
    target!(nar_parse, seeds_nar, NAR_DICT, 1 << 16),
    target!(nar_check, seeds_nar, NAR_DICT, 1 << 16),
    target!(nar_restore, seeds_nar, NAR_DICT, 1 << 16),
    target!(narinfo, seeds_narinfo, NARINFO_DICT, 1 << 14),
    target!(substituter_check, seeds_narinfo, NARINFO_DICT, 1 << 14),
    target!(derivation, seeds_drv, DRV_DICT, 1 << 15),
    target!(machines, seeds_machines, CONF_DICT, 1 << 13),
    target!(nixconf, seeds_nixconf, CONF_DICT, 1 << 14),
    target!(wire, seeds_wire, WIRE_DICT, 1 << 14),
    target!(hook_protocol, seeds_hook, WIRE_DICT, 1 << 14),
    target!(hook_args_replies, seeds_argv, TEXT_DICT, 1 << 12),
    target!(serve_client, seeds_serve, WIRE_DICT, 1 << 14),
    target!(substituter_paths, seeds_paths, PATH_DICT, 1 << 12),
    target!(retry_after, seeds_retry_after, TEXT_DICT, 256),
    target!(target_url, seeds_target_url, TEXT_DICT, 1 << 12),
    target!(spool, seeds_spool, TEXT_DICT, 1 << 12),
    target!(signing, seeds_signing, TEXT_DICT, 1 << 12),
    target!(store_path, seeds_store_path, TEXT_DICT, 1 << 12),
    target!(hash, seeds_hash, TEXT_DICT, 1 << 12),
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// ferry-nix/tests/golden in this checkout.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferry-nix/tests/golden")
}

/// ferry-fuzz/seeds/<target>: hand-made and regression seeds, one file each.
pub fn extra_seeds(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(name);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Files under `dir` (recursively) whose name satisfies `keep`, sorted by path.
fn golden_files(dir: &str, keep: impl Fn(&str) -> bool) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&golden_dir().join(dir), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter(|p| keep(&p.file_name().unwrap_or_default().to_string_lossy()))
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn texts(seeds: &[&str]) -> Vec<Vec<u8>> {
    seeds.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn only_bytes(v: Vec<(PathBuf, Vec<u8>)>) -> Vec<Vec<u8>> {
    v.into_iter().map(|(_, b)| b).collect()
}

/// Whitespace-separated words of golden text files, one per line.
fn words(dir: &str, file: &str) -> Vec<u8> {
    let mut out = String::new();
    for (_, b) in golden_files(dir, |n| n == file) {
        for w in String::from_utf8_lossy(&b).split_whitespace() {
            out.push_str(w);
            out.push('\n');
        }
    }
    out.into_bytes()
}

fn seeds_nar() -> Vec<Vec<u8>> {
    only_bytes(golden_files("nar", |n| n.ends_with(".nar")))
}

fn seeds_narinfo() -> Vec<Vec<u8>> {
    only_bytes(golden_files("narinfo", |n| {
        n.ends_with(".narinfo") || n == "nix-cache-info"
    }))
}

fn seeds_drv() -> Vec<Vec<u8>> {
    only_bytes(golden_files("derivation", |n| n.ends_with(".drv")))
}

fn seeds_machines() -> Vec<Vec<u8>> {
    let key = golden_files("nixconf/machines-fixture", |n| n.ends_with(".b64"))
        .into_iter()
        .next()
        .map(|(_, b)| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    [
        "nix-builder@ser5.internal x86_64-linux /home/u/.ssh/id_nix_builder 12 4 nixos-test,benchmark,big-parallel,kvm - -\n\
         ssh-ng://nix-builder@nas-01 x86_64-linux,aarch64-linux - 4 1 nixos-test,benchmark,big-parallel,kvm - -\n"
            .to_owned(),
        "ssh://nix-builder@192.168.15.6 x86_64-linux /etc/nix/builder_key 2 1".to_owned(),
        "ssh://localhost?remote-store=/tmp/t/machine1?system-features=foo - - 1 1 foo; ssh://localhost?remote-store=/tmp/t/machine2 - - 1 1 bar".to_owned(),
        format!("# builders\nssh://b1 x86_64-linux,i686-linux /k 2 2.5 kvm big-parallel {key}\n@/etc/nix/more\n=== /etc/nix/more\nb2 aarch64-linux - 1 1 - - -\n@/etc/nix/machines\n"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

fn seeds_nixconf() -> Vec<Vec<u8>> {
    let base = golden_dir().join("nixconf/dirs");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&base)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let rel = d
            .strip_prefix(golden_dir())
            .unwrap_or(&d)
            .to_string_lossy()
            .into_owned();
        let mut main = String::new();
        let mut files = Vec::new();
        for (p, b) in golden_files(&rel, |_| true) {
            let text = String::from_utf8_lossy(&b).into_owned();
            let name = p
                .strip_prefix(&d)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            match name.as_str() {
                "nix.conf" => main = text,
                "NIX_CONFIG" => files.push(("NIX_CONFIG".to_owned(), text)),
                _ => files.push((format!("/etc/nix/{name}"), text)),
            }
        }
        out.push(targets::VirtualFs::render(&main, &files).into_bytes());
    }
    out
}

fn wire_goldens(name: &str) -> Vec<Vec<u8>> {
    only_bytes(golden_files("wire", |n| n == name))
}

/// The wire goldens in `name`, each after a first byte `tag` (a script or operation choice
/// of the target).
fn tagged_wire_goldens(tag: u8, name: &str) -> impl Iterator<Item = Vec<u8>> {
    wire_goldens(name).into_iter().map(move |b| {
        let mut v = vec![tag];
        v.extend_from_slice(&b);
        v
    })
}

fn seeds_wire() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (script, file) in [
        (0x00u8, "hook-stdin.bin"),
        (0x55, "hook-stdin.bin"),
        (0xf0, "serve-reply.bin"),
        (0x3c, "serve-request.bin"),
    ] {
        out.extend(tagged_wire_goldens(script, file));
    }
    out
}

fn seeds_hook() -> Vec<Vec<u8>> {
    let mut out = wire_goldens("hook-stdin.bin");
    // An accepted job after the `try`: inputs and wanted outputs, then a second `try`.
    if let Some(first) = out.first().cloned() {
        let mut v = first;
        v.extend(1u64.to_le_bytes());
        v.extend(mutate::wire_string(
            b"/nix/store/pci9hq6r0sb60ls8nq6867hdn4akb335-wire-golden",
        ));
        v.extend(1u64.to_le_bytes());
        v.extend(mutate::wire_string(b"out"));
        v.extend(mutate::wire_string(b"try"));
        v.extend(0u64.to_le_bytes());
        v.extend(mutate::wire_string(b"x86_64-linux"));
        v.extend(mutate::wire_string(
            b"/nix/store/4id9fvxwrbwj7yw3rsvajsg616nk0nid-wire-golden.drv",
        ));
        v.extend(0u64.to_le_bytes());
        out.push(v);
    }
    out
}

fn seeds_argv() -> Vec<Vec<u8>> {
    let mut out = only_bytes(golden_files("cli", |n| n.ends_with(".argv")));
    out.push(b"build-remote\n7".to_vec());
    out.push(b"ferry-build-hook\0--flag\0 3 ".to_vec());
    out.push(
        "a message \"quoted\" \\ with\ttabs\nand \u{7} bells é"
            .as_bytes()
            .to_vec(),
    );
    out
}

const SERVE_MAGIC_2: u64 = 0x5452_eecb;

fn handshake() -> Vec<u8> {
    let mut v = SERVE_MAGIC_2.to_le_bytes().to_vec();
    v.extend(0x207u64.to_le_bytes());
    v
}

fn seeds_serve() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = tagged_wire_goldens(0, "serve-reply.bin").collect();
    // query_closure: one path.
    let mut v = vec![2u8];
    v.extend(handshake());
    v.extend(1u64.to_le_bytes());
    v.extend(mutate::wire_string(
        b"/nix/store/hfv8m9zs7zqlqq8ybh49yx19zfh95fwc-hello.txt",
    ));
    out.push(v);
    // build_derivation: a failure with a message, timings, one built output.
    let mut v = vec![3u8];
    v.extend(handshake());
    v.extend(1u64.to_le_bytes());
    v.extend(mutate::wire_string(b"builder failed with exit code 1"));
    for n in [1u64, 0, 1_700_000_000, 1_700_000_005, 1] {
        v.extend(n.to_le_bytes());
    }
    v.extend(mutate::wire_string(b"sha256:abc!out"));
    v.extend(mutate::wire_string(b"{\"id\":\"sha256:abc!out\"}"));
    out.push(v);
    // dump_store_path: each golden NAR; add_to_store_nar: the remote's 1.
    for nar in seeds_nar().into_iter().take(7) {
        let mut v = vec![4u8];
        v.extend(handshake());
        v.extend(nar);
        v.extend(1u64.to_le_bytes());
        out.push(v);
    }
    out
}

fn seeds_paths() -> Vec<Vec<u8>> {
    texts(&[
        "/nix-cache-info",
        "/metrics",
        "/ferry/status",
        "/kvpm810qs80pka1bfbqxvsivc1qq3bgl.narinfo",
        "/kvpm810qs80pka1bfbqxvsivc1qq3bgl.narinfo?x=1",
        "/nar/17x84yv0x69x3gvb3rj9w9rm6xdps6533zzzbadqkgbzza3f8asc.nar.xz",
        "/nar/%2e%2e/%2e%2e/secret",
        "/log/33vxksxv4q76xwnj9ic5m4v9l2f4qm77-ferry-simple.drv",
        "/realisations/sha256:abc!out.doi",
        "/kvpm810qs80pka1bfbqxvsivc1qq3bgl.ls",
        "/debuginfo/0123456789abcdef",
        "nar/x.nar?hash=abc",
        "http://cache.example:8080/base/nar/x.nar",
        "https://cache.example/nar/x.nar",
        "https://elsewhere.example/presigned?sig=1",
        "StorePath: /nix/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt\nURL: nar/x.nar\nCompression: none\n",
    ])
}

fn seeds_retry_after() -> Vec<Vec<u8>> {
    texts(&[
        "120",
        " 0 ",
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "Thu, 01 Jan 2099 00:00:00 GMT",
        "Tue, 29 Feb 2000 23:59:60 GMT",
    ])
}

fn seeds_target_url() -> Vec<Vec<u8>> {
    texts(&[
        "file:///var/cache/ferry?compression=zstd",
        "file:///srv/cache/",
        "http://cache.example:5000/",
        "https://user:secret@cache.example/sub?compression=xz",
        "s3://bucket?endpoint=http://127.0.0.1:9000&region=eu-west-1&scheme=http&profile=ci",
        "s3://my-bucket/prefix?compression=none&region=us-east-1",
        "s3://b?endpoint=minio%3A9000&scheme=https",
    ])
}

fn seeds_spool() -> Vec<Vec<u8>> {
    texts(&[
        "ferry-post-build-spool 1\ndrv /nix/store/33vxksxv4q76xwnj9ic5m4v9l2f4qm77-ferry-simple.drv\nout /nix/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt\nout /nix/store/aw7bi1fv6akpyhw0lhxs9rdhgskhzzgl-tree\n",
        "ferry-post-build-spool 1\nout /nix/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt\n\n",
        "ferry-post-build-spool 1\r\ndrv /x.drv\r\n",
    ])
}

fn seeds_signing() -> Vec<Vec<u8>> {
    let mut out = only_bytes(golden_files("narinfo", |n| {
        n.ends_with(".pub") || n.ends_with(".sec")
    }));
    out.push(words("narinfo", "sigs.txt"));
    out.push(b"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=".to_vec());
    out
}

fn seeds_store_path() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in ["derivation", "cli", "narinfo"] {
        let mut v = b"/nix/store\n".to_vec();
        v.extend(words(dir, "paths.txt"));
        out.push(v);
    }
    out.push(
        b"/gnu/store\n/gnu/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt/bin/sh\nkvpm810qs80pka1bfbqxvsivc1qq3bgl-a.drv\n"
            .to_vec(),
    );
    out
}

fn seeds_hash() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (dir, file) in [("hash", "hashes.txt"), ("nar", "hashes.txt")] {
        let w = words(dir, file);
        out.push(w.clone());
        // The same words with algorithm prefixes, as narinfos and the wire carry them.
        let mut v = Vec::new();
        for line in String::from_utf8_lossy(&w).lines() {
            v.extend(format!("sha256:{line}\nsha512:{line}\n").into_bytes());
        }
        out.push(v);
    }
    out
}
