//! `[substituter.local]` in process, against a store made here: a directory of store paths
//! and a database with the tables and columns of Nix 2.8 to 2.34 (the fleet tests in
//! `integration/tests/e2e/substituter_local.rs` use real Nix stores). Narinfos, signatures,
//! NARs byte for byte, ranges, hostile keys, and NARs that change or vanish mid-stream.

mod common;

use common::{Resp, settings, spawn_ferry, split};
use ferry_nix::hash::Hash;
use ferry_nix::narinfo::NarInfo;
use ferry_nix::signing::SecretKey;
use ferry_nix::store_path::StoreDir;
use ferry_substituter::config::{LocalConfig, NixTrust, SubstituterConfig};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The parts of Nix's `schema.sql` Ferry reads (identical in 2.8 and 2.34), and its WAL mode.
const SCHEMA: &str = "
PRAGMA journal_mode = wal;
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
";

struct Store {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    sd: StoreDir,
}

impl Store {
    fn new() -> Store {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("store");
        let state = tmp.path().join("var");
        std::fs::create_dir_all(&dir).expect("store");
        std::fs::create_dir_all(state.join("db")).expect("db dir");
        let c = rusqlite::Connection::open(state.join("db/db.sqlite")).expect("db");
        c.execute_batch(SCHEMA).expect("schema");
        let sd = StoreDir::new(dir.to_str().expect("utf-8")).expect("store dir");
        Store {
            _tmp: tmp,
            dir,
            state,
            sd,
        }
    }

    /// Registers the tree at `<store>/<base>` as Nix would: its NAR hash and size.
    fn register(
        &self,
        base: &str,
        refs: &[&str],
        deriver: Option<&str>,
        sigs: &str,
    ) -> (Hash, u64) {
        let path = self.dir.join(base);
        let (hash, size) = ferry_nix::nar::dump_path_hashed(&path, std::io::sink()).expect("dump");
        let c = rusqlite::Connection::open(self.state.join("db/db.sqlite")).expect("db");
        let full = |b: &str| format!("{}/{b}", self.dir.display());
        c.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, sigs) values (?1, ?2, 1, ?3, ?4, ?5)",
            rusqlite::params![
                full(base),
                format!("sha256:{}", hash.to_base16()),
                deriver.map(full),
                size as i64,
                sigs
            ],
        )
        .expect("insert");
        for r in refs {
            c.execute(
                "insert into Refs (referrer, reference) select a.id, b.id from ValidPaths a, ValidPaths b where a.path = ?1 and b.path = ?2",
                rusqlite::params![full(base), full(r)],
            )
            .expect("ref");
        }
        (hash, size)
    }

    fn unregister(&self, base: &str) {
        let c = rusqlite::Connection::open(self.state.join("db/db.sqlite")).expect("db");
        c.execute(
            "delete from ValidPaths where path = ?1",
            [format!("{}/{base}", self.dir.display())],
        )
        .expect("delete");
    }
}

const LEAF: &str = "0c0ilf4xs3ndm7lx7jglb9p8g8g2yq8p-leaf";
const TOP: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5-top";
const DRV: &str = "2i2a3bjwdi8jp8whk5c1g1yr1j5lmm20-top.drv";

fn key() -> SecretKey {
    SecretKey::from_seed("local-test-1", [9; 32]).expect("key")
}

fn write_tree(store: &Store) {
    let leaf = store.dir.join(LEAF);
    std::fs::write(&leaf, b"leaf contents\n").expect("leaf");
    let top = store.dir.join(TOP);
    std::fs::create_dir_all(top.join("bin")).expect("top");
    std::fs::write(top.join("bin/run"), b"#!/bin/sh\necho hi\n").expect("run");
    let mut p = std::fs::metadata(top.join("bin/run"))
        .expect("meta")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o555);
    std::fs::set_permissions(top.join("bin/run"), p).expect("chmod");
    std::os::unix::fs::symlink(store.dir.join(LEAF), top.join("leaf")).expect("symlink");
}

/// Ferry in process serving `store` (no upstream), signing with [`key`].
async fn ferry(store: &Store, keys: bool) -> String {
    ferry_with(store, keys, false).await
}

async fn ferry_with(store: &Store, keys: bool, verify_nar_hash: bool) -> String {
    let kdir = store.state.join("keys");
    std::fs::create_dir_all(&kdir).expect("keys");
    let kfile = kdir.join("sk");
    std::fs::write(&kfile, key().to_key_file_text()).expect("key file");
    let c = SubstituterConfig {
        store_dir: store.sd.as_str().to_owned(),
        local: Some(LocalConfig {
            secret_key_files: if keys { vec![kfile] } else { vec![] },
            nix_state_dir: Some(store.state.clone()),
            verify_nar_hash,
        }),
        ..SubstituterConfig::default()
    };
    let s = settings(c, NixTrust::default());
    // Serving the own store needs no upstream: never the cache.nixos.org default.
    assert!(s.upstreams.is_empty(), "{:?}", s.upstreams);
    spawn_ferry(s).await
}

/// A raw HTTP/1.1 request (see [`common::raw`]).
async fn raw(addr: &str, method: &str, target: &str, extra: &str) -> Resp {
    common::raw(addr, method, target, extra, Duration::from_secs(20)).await
}

fn hash_part(base: &str) -> &str {
    &base[..32]
}

#[tokio::test]
async fn serves_signed_narinfos_and_nars_byte_for_byte_with_ranges() {
    let store = Store::new();
    write_tree(&store);
    std::fs::write(store.dir.join(DRV), b"Derive()").expect("drv");
    store.register(LEAF, &[], None, "");
    let own = {
        // A signature the path already has (from a cache it was substituted from).
        let other = SecretKey::from_seed("cache.example.org-1", [3; 32]).expect("key");
        let (h, n) =
            ferry_nix::nar::dump_path_hashed(&store.dir.join(TOP), std::io::sink()).expect("dump");
        let leaf = store
            .sd
            .parse(&format!("{}/{LEAF}", store.dir.display()))
            .expect("p");
        let top = store
            .sd
            .parse(&format!("{}/{TOP}", store.dir.display()))
            .expect("p");
        let fp = ferry_nix::narinfo::fingerprint(&store.sd, &top, &h, n, [&leaf]).expect("fp");
        other.sign(fp.as_bytes()).to_string()
    };
    let (nar_hash, nar_size) = store.register(TOP, &[LEAF], Some(DRV), &own);
    let addr = ferry(&store, true).await;

    let r = raw(&addr, "GET", &format!("/{}.narinfo", hash_part(TOP)), "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let text = String::from_utf8(r.body).expect("utf-8");
    let ni = NarInfo::parse(&store.sd, &text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(ni.nar_hash, nar_hash);
    assert_eq!(ni.nar_size, nar_size);
    assert_eq!(ni.compression, "none");
    assert_eq!(ni.references.len(), 1);
    assert_eq!(ni.deriver.as_ref().map(|d| d.as_str()), Some(DRV));
    assert_eq!(ni.sigs.len(), 2, "{text}");
    assert!(text.contains(&format!("Sig: {own}\n")), "{text}");
    assert!(
        ni.verify_with(&store.sd, &key().to_public()).expect("fp"),
        "{text}"
    );
    // Exactly Nix's rendering: what `NarInfo::to_string` writes for these fields.
    assert_eq!(text, ni.render(&store.sd));
    assert_eq!(
        ni.url,
        format!("nar/{}-{}.nar", hash_part(TOP), nar_hash.to_nix32())
    );

    let mut expect = Vec::new();
    ferry_nix::nar::dump_path(&store.dir.join(TOP), &mut expect).expect("dump");
    let nar = format!("/{}", ni.url);
    let r = raw(&addr, "GET", &nar, "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("content-length"), Some(nar_size.to_string()));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(r.body, expect);

    let r = raw(&addr, "GET", &nar, "Range: bytes=100-\r\n").await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.body, expect[100..]);
    let r = raw(&addr, "GET", &nar, "Range: bytes=8-15\r\n").await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.body, expect[8..16]);
    let r = raw(&addr, "GET", &nar, &format!("Range: bytes={nar_size}-\r\n")).await;
    assert_eq!(r.status, 416, "{}", r.head);
    let r = raw(&addr, "HEAD", &nar, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(nar_size.to_string()));
    assert!(r.body.is_empty());

    // The leaf has no signature of its own: the configured key's only.
    let r = raw(&addr, "GET", &format!("/{}.narinfo", hash_part(LEAF)), "").await;
    assert_eq!(r.status, 200);
    let leaf = NarInfo::parse(&store.sd, &String::from_utf8(r.body).expect("utf-8")).expect("p");
    assert_eq!(leaf.sigs.len(), 1);

    // Misses: an unknown hash, a NAR key whose content hash is not the path's, a path that is
    // no longer valid (collected: the store's database no longer lists it).
    let r = raw(
        &addr,
        "GET",
        "/00000000000000000000000000000000.narinfo",
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    let wrong = format!(
        "/nar/{}-{}.nar",
        hash_part(TOP),
        Hash::sha256_of(b"x").to_nix32()
    );
    assert_eq!(raw(&addr, "GET", &wrong, "").await.status, 404);
    // As Nix's collector does: invalidate, then delete.
    store.unregister(TOP);
    delete_tree(&store.dir.join(TOP));
    let r = raw(&addr, "GET", &format!("/{}.narinfo", hash_part(TOP)), "").await;
    assert_eq!(r.status, 404, "a collected path is gone at once");
    let r = raw(&addr, "GET", &format!("/{}", ni.url), "").await;
    assert_eq!(r.status, 404, "and so is its NAR");

    // Hostile request paths: the request-path rules apply before the store is consulted.
    for t in [
        format!("/nar/../{}", ni.url),
        "/nar/%2e%2e/%2e%2e/etc/passwd".to_owned(),
        format!("/nar/{}-..%2f..%2fetc.nar", hash_part(TOP)),
        format!("/{}.narinfo/../../etc/passwd", hash_part(TOP)),
    ] {
        let r = raw(&addr, "GET", &t, "").await;
        assert_eq!(r.status, 404, "{t}: {}", r.head);
    }
    let r = raw(
        &addr,
        "PUT",
        &format!("/{}.narinfo", hash_part(TOP)),
        "Content-Length: 0\r\n",
    )
    .await;
    assert_eq!(r.status, 405);

    let r = raw(&addr, "GET", "/metrics", "").await;
    let m = String::from_utf8_lossy(&r.body);
    assert!(
        m.contains("ferry_substituter_local_narinfo_hits_total 2\n"),
        "{m}"
    );
    assert!(
        m.contains("ferry_substituter_local_nar_requests_total 5\n"),
        "{m}"
    );
    let r = raw(&addr, "GET", "/ferry/status", "").await;
    assert!(
        String::from_utf8_lossy(&r.body).contains("local store: 2 narinfo hits"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test]
async fn an_unsigned_path_is_served_unsigned_when_no_key_is_configured() {
    let store = Store::new();
    write_tree(&store);
    store.register(LEAF, &[], None, "");
    let addr = ferry(&store, false).await;
    let r = raw(&addr, "GET", &format!("/{}.narinfo", hash_part(LEAF)), "").await;
    assert_eq!(r.status, 200);
    let ni = NarInfo::parse(&store.sd, &String::from_utf8(r.body).expect("utf-8")).expect("p");
    assert!(ni.sigs.is_empty());
}

/// With `verify-nar-hash`, a NAR whose content no longer matches the database (changed in
/// place, same size) is never ended cleanly: the last chunk waits for the hash check, and the connection is cut.
#[tokio::test]
async fn a_nar_that_differs_from_its_narhash_is_aborted_never_completed() {
    let store = Store::new();
    write_tree(&store);
    let (_, size) = store.register(LEAF, &[], None, "");
    std::fs::write(store.dir.join(LEAF), b"LEAF CONTENTS\n").expect("overwrite");
    let addr = ferry_with(&store, true, true).await;
    let r = raw(&addr, "GET", &format!("/{}.narinfo", hash_part(LEAF)), "").await;
    let ni = NarInfo::parse(&store.sd, &String::from_utf8(r.body).expect("utf-8")).expect("p");
    let r = raw(&addr, "GET", &format!("/{}", ni.url), "").await;
    // hyper sends the head with the first chunk: a NAR that fits in one chunk is cut before
    // even the status line goes out (0), a longer one after it.
    assert!(r.status == 0 || r.status == 200, "{}", r.head);
    if r.status == 200 {
        assert_eq!(r.header("content-length"), Some(size.to_string()));
    }
    assert!(
        (r.body.len() as u64) < size,
        "a changed NAR was served whole ({} of {size} bytes)",
        r.body.len()
    );
    let r = raw(&addr, "GET", "/metrics", "").await;
    assert!(
        String::from_utf8_lossy(&r.body).contains("ferry_substituter_local_nar_aborts_total 1\n")
    );
}

/// A path deleted (garbage-collected) while its NAR streams: the stream ends short of its
/// `Content-Length` (the connection is aborted), never as a complete NAR.
#[tokio::test]
async fn a_path_collected_mid_stream_aborts_the_connection() {
    let store = Store::new();
    let base = "3a1kxqm3qwx8mnl9sm8cg2xhgr9b1hyd-big";
    let dir = store.dir.join(base);
    std::fs::create_dir_all(&dir).expect("big");
    // 64 files of 1 MiB: far more than the stream's queue and the sockets' buffers.
    let mut blob = vec![0u8; 1 << 20];
    for i in 0..64u32 {
        for (j, b) in blob.iter_mut().enumerate() {
            *b = (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8;
        }
        std::fs::write(dir.join(format!("f{i:02}")), &blob).expect("file");
    }
    let (_, size) = store.register(base, &[], None, "");
    let addr = ferry(&store, true).await;
    let r = raw(&addr, "GET", &format!("/{}.narinfo", hash_part(base)), "").await;
    let ni = NarInfo::parse(&store.sd, &String::from_utf8(r.body).expect("utf-8")).expect("p");
    let target = format!("/{}", ni.url);
    let dir2 = dir.clone();
    let got = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "GET {target} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = vec![0u8; 64 * 1024];
        let mut first = Vec::new();
        let n = s.read(&mut out).expect("first read");
        first.extend_from_slice(&out[..n]);
        // The stream has started: collect the path (as `nix-store --delete` does).
        delete_tree(&dir2);
        let _ = s.read_to_end(&mut first);
        split(first)
    })
    .await
    .expect("client");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some(size.to_string()));
    assert!(
        (got.body.len() as u64) < size,
        "a collected path was served whole"
    );
}

fn delete_tree(p: &Path) {
    // Only the directory this test made under its temp dir.
    assert!(p.to_string_lossy().contains("/store/"));
    std::fs::remove_dir_all(p).expect("delete");
}

/// A database without Nix's columns is refused at start, not served wrongly.
#[test]
fn a_database_with_another_schema_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("db")).expect("db");
    let c = rusqlite::Connection::open(tmp.path().join("db/db.sqlite")).expect("db");
    c.execute_batch("create table ValidPaths (id integer, path text);")
        .expect("schema");
    let e = ferry_substituter::local::LocalStore::open(
        StoreDir::new("/nix/store").expect("sd"),
        tmp.path().join("db/db.sqlite"),
        vec![],
        false,
    )
    .err()
    .expect("refused");
    // A database that does not exist yet (a fresh host) is not an error at start.
    assert!(
        ferry_substituter::local::LocalStore::open(
            StoreDir::new("/nix/store").expect("sd"),
            tmp.path().join("none/db.sqlite"),
            vec![],
            false,
        )
        .is_ok()
    );
    assert!(e.to_string().contains("no column hash"), "{e}");
}
