//! The disk cache in-process, against programmable HTTP upstreams: NARs and narinfos served
//! from disk with the upstream down (also after a restart, from the rebuilt index), `Range` on
//! disk hits, quota eviction by last use, and the rule that only a complete, verified stream
//! becomes an entry (cut streams, wrong hashes, crashes leave nothing).

mod common;

use axum::body::Body;
use axum::http::{HeaderMap, Uri};
use bytes::Bytes;
use common::{
    H, check_range_from, head, narinfo_text, settings, spawn_app, spawn_ferry, status,
    trust_anything,
};
use ferry_nix::hash::Hash;
use ferry_substituter::config::{SubstituterConfig, UpstreamConfig};
use ferry_substituter::disk::nar_entry;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn data(len: usize, seed: u32) -> Arc<Vec<u8>> {
    Arc::new(
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
            .collect(),
    )
}

fn narinfo(hash: &str, key: &str, nar: &[u8]) -> String {
    narinfo_text(hash, key, &Hash::sha256_of(nar), nar.len())
}

/// An upstream serving `files` (path → bytes; NARs in 64 KiB chunks `chunk_delay` apart), or
/// 500 to everything while `down`.
struct Upstream {
    url: String,
    hits: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

async fn upstream(files: Vec<(String, Arc<Vec<u8>>)>, chunk_delay: Duration) -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (h, d) = (Arc::clone(&hits), Arc::clone(&down));
    let files = Arc::new(files);
    let app = axum::Router::new().fallback(move |uri: Uri, _: HeaderMap| {
        h.fetch_add(1, Ordering::SeqCst);
        let down = d.load(Ordering::SeqCst);
        let files = Arc::clone(&files);
        async move {
            if down {
                return status(500, "down");
            }
            let Some((_, body)) = files.iter().find(|(p, _)| *p == uri.path()) else {
                return status(404, "");
            };
            let len = body.len();
            let chunks: Vec<Bytes> = body.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
            let stream =
                futures_util::stream::unfold(chunks.into_iter(), move |mut it| async move {
                    let c = it.next()?;
                    tokio::time::sleep(chunk_delay).await;
                    Some((Ok::<_, std::io::Error>(c), it))
                });
            let mut r = status(200, Body::from_stream(stream));
            r.headers_mut()
                .insert("content-length", len.to_string().parse().expect("header"));
            r
        }
    });
    let url = format!("http://{}", spawn_app(app).await);
    Upstream { url, hits, down }
}

/// Starts Ferry with one upstream and a disk cache in `dir`; returns its base URL.
async fn ferry(up: &str, dir: &Path, max_size: u64) -> String {
    let c = SubstituterConfig {
        upstream: vec![UpstreamConfig::new(up)],
        cache_dir: Some(dir.to_owned()),
        cache_max_size: ferry_substituter::config::ByteSize(max_size),
        ..SubstituterConfig::default()
    };
    format!(
        "http://{}",
        spawn_ferry(settings(c, trust_anything())).await
    )
}

async fn get(url: &str) -> (u16, Bytes) {
    let r = reqwest::get(url).await.expect("request to Ferry");
    let code = r.status().as_u16();
    (code, r.bytes().await.expect("whole body"))
}

async fn metric(ferry: &str, name: &str) -> f64 {
    let (_, m) = get(&format!("{ferry}/metrics")).await;
    let m = String::from_utf8_lossy(&m).into_owned();
    m.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{m}"))
}

/// Waits until `name` reaches `want` (disk commits finish just after the last byte is sent).
async fn wait_metric(ferry: &str, name: &str, want: f64) {
    let t = Instant::now();
    loop {
        let v = metric(ferry, name).await;
        if v >= want {
            assert_eq!(v, want, "{name}");
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Records the expected hash of `key` as a narinfo Ferry served would have (issue 12 item 2:
/// only NARs with a known hash are kept).
fn expect_hash(dir: &Path, key: &str, nar: &[u8]) {
    let path = dir.join(ferry_substituter::disk::nar_hash_entry(key));
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(
        path,
        format!(
            "{} {}\n",
            Hash::sha256_of(nar).to_nix32_prefixed(),
            nar.len()
        ),
    )
    .expect("record");
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn served_from_disk_with_the_upstream_down_and_after_a_restart() {
    let nar = data(3_000_000, 1);
    let info = narinfo(H, "nar/x.nar", &nar);
    let up = upstream(
        vec![
            (format!("/{H}.narinfo"), Arc::new(info.clone().into_bytes())),
            ("/nar/x.nar".into(), Arc::clone(&nar)),
        ],
        Duration::ZERO,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let f = ferry(&up.url, dir.path(), 1 << 30).await;

    assert_eq!(
        get(&format!("{f}/{H}.narinfo")).await,
        (200, Bytes::from(info.clone()))
    );
    let (code, body) = get(&format!("{f}/nar/x.nar")).await;
    assert_eq!(code, 200);
    assert!(body[..] == nar[..]);
    wait_metric(&f, "ferry_substituter_disk_nar_stored_total", 1.0).await;
    assert_eq!(
        std::fs::read(dir.path().join(nar_entry("nar/x.nar"))).expect("entry")[..],
        nar[..]
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join(format!("narinfo/{H}.narinfo"))).expect("narinfo"),
        info
    );
    assert!(files_in(&dir.path().join("tmp")).is_empty());

    // The upstream goes down: the NAR comes from disk, with ranges, and nobody asks upstream.
    up.down.store(true, Ordering::SeqCst);
    let hits = up.hits.load(Ordering::SeqCst);
    let (code, body) = get(&format!("{f}/nar/x.nar")).await;
    assert_eq!(code, 200);
    assert!(body[..] == nar[..], "disk hit differs");
    check_range_from(&format!("{f}/nar/x.nar"), &nar, 2_999_000).await;
    let r = head(&format!("{f}/nar/x.nar")).await;
    assert_eq!(
        r.headers().get("content-length").map(|v| v.as_bytes()),
        Some(&b"3000000"[..])
    );
    assert_eq!(
        metric(&f, "ferry_substituter_disk_nar_hits_total").await,
        3.0
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "the upstream was asked"
    );

    // A new instance on the same directory (the index rebuilt from the files) serves the
    // narinfo and the NAR with the upstream still down.
    let g = ferry(&up.url, dir.path(), 1 << 30).await;
    assert_eq!(
        get(&format!("{g}/{H}.narinfo")).await,
        (200, Bytes::from(info))
    );
    let (code, body) = get(&format!("{g}/nar/x.nar")).await;
    assert_eq!(code, 200);
    assert!(body[..] == nar[..]);
    assert_eq!(
        metric(&g, "ferry_substituter_disk_narinfo_hits_total").await,
        1.0
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "the upstream was asked"
    );
    assert_eq!(metric(&g, "ferry_substituter_disk_entries").await, 2.0);
}

#[tokio::test]
async fn a_nar_whose_hash_differs_from_the_narinfo_is_not_kept() {
    let nar = data(500_000, 2);
    let other = data(500_000, 3);
    // The narinfo announces `other`'s hash with the same size.
    let info = narinfo(H, "nar/y.nar", &other);
    let up = upstream(
        vec![
            (format!("/{H}.narinfo"), Arc::new(info.into_bytes())),
            ("/nar/y.nar".into(), Arc::clone(&nar)),
        ],
        Duration::ZERO,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let f = ferry(&up.url, dir.path(), 1 << 30).await;
    assert_eq!(get(&format!("{f}/{H}.narinfo")).await.0, 200);
    // Ferry passes the bytes on (Nix checks NarHash itself) but does not keep them.
    assert_eq!(get(&format!("{f}/nar/y.nar")).await.0, 200);
    wait_metric(&f, "ferry_substituter_disk_nar_discarded_total", 1.0).await;
    assert!(files_in(&dir.path().join("nar")).is_empty());
    // The narinfo and its NAR's hash record are written in the background: wait for them.
    let t = Instant::now();
    while !files_in(&dir.path().join("tmp")).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "temp files left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn quota_evicts_the_least_recently_used_nar() {
    let (a, b, c) = (data(1_000_000, 4), data(1_000_000, 5), data(1_000_000, 6));
    let up = upstream(
        vec![
            ("/nar/a.nar".into(), Arc::clone(&a)),
            ("/nar/b.nar".into(), Arc::clone(&b)),
            ("/nar/c.nar".into(), Arc::clone(&c)),
        ],
        Duration::ZERO,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    for (k, n) in [("nar/a.nar", &a), ("nar/b.nar", &b), ("nar/c.nar", &c)] {
        expect_hash(dir.path(), k, n);
    }
    let f = ferry(&up.url, dir.path(), 2_500_000).await;
    assert_eq!(get(&format!("{f}/nar/a.nar")).await.0, 200);
    wait_metric(&f, "ferry_substituter_disk_nar_stored_total", 1.0).await;
    assert_eq!(get(&format!("{f}/nar/b.nar")).await.0, 200);
    wait_metric(&f, "ferry_substituter_disk_nar_stored_total", 2.0).await;
    // `a` is used again (from disk), so `b` is now the least recently used.
    let (code, body) = get(&format!("{f}/nar/a.nar")).await;
    assert_eq!((code, &body[..]), (200, &a[..]));
    assert_eq!(
        metric(&f, "ferry_substituter_disk_nar_hits_total").await,
        1.0
    );
    assert_eq!(get(&format!("{f}/nar/c.nar")).await.0, 200);
    wait_metric(&f, "ferry_substituter_disk_nar_stored_total", 3.0).await;

    assert!(dir.path().join(nar_entry("nar/a.nar")).exists());
    assert!(!dir.path().join(nar_entry("nar/b.nar")).exists(), "b kept");
    assert!(dir.path().join(nar_entry("nar/c.nar")).exists());
    assert_eq!(
        metric(&f, "ferry_substituter_disk_evictions_total").await,
        1.0
    );
    assert_eq!(
        metric(&f, "ferry_substituter_disk_bytes").await,
        2_000_000.0
    );
    // `b` comes from the upstream again.
    let hits = up.hits.load(Ordering::SeqCst);
    let (code, body) = get(&format!("{f}/nar/b.nar")).await;
    assert_eq!((code, &body[..]), (200, &b[..]));
    assert_eq!(up.hits.load(Ordering::SeqCst), hits + 1);
}

#[tokio::test]
async fn a_cut_stream_leaves_no_entry_and_start_up_clears_leftovers() {
    // 4 MiB in 64 KiB chunks, 20 ms apart: about 1.3 s to stream.
    let nar = data(4 << 20, 7);
    let up = upstream(
        vec![("/nar/slow.nar".into(), Arc::clone(&nar))],
        Duration::from_millis(20),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    expect_hash(dir.path(), "nar/slow.nar", &nar);
    let f = ferry(&up.url, dir.path(), 1 << 30).await;
    let mut r = reqwest::get(format!("{f}/nar/slow.nar"))
        .await
        .expect("get");
    let mut got = 0;
    while got < 200_000 {
        got += r.chunk().await.expect("chunk").expect("more").len();
    }
    // Mid-stream, a temp file exists and no entry.
    assert_eq!(files_in(&dir.path().join("tmp")).len(), 1);
    drop(r);
    wait_metric(&f, "ferry_substituter_disk_nar_discarded_total", 1.0).await;
    assert!(
        files_in(&dir.path().join("tmp")).is_empty(),
        "temp file left"
    );
    assert!(
        files_in(&dir.path().join("nar")).is_empty(),
        "partial NAR kept"
    );
    assert_eq!(
        metric(&f, "ferry_substituter_disk_nar_stored_total").await,
        0.0
    );

    // What a killed process would leave behind is removed when the next one starts.
    std::fs::write(dir.path().join("tmp/123-0"), b"half a NAR").expect("leftover");
    let g = ferry(&up.url, dir.path(), 1 << 30).await;
    assert_eq!(get(&format!("{g}/nix-cache-info")).await.0, 200);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

/// Issue 12 item 2: a NAR asked for with no narinfo Ferry served (before it, or after a
/// restart) was kept after a length check only, and served from disk unchecked.
#[tokio::test]
async fn a_nar_with_no_known_hash_is_streamed_but_not_kept() {
    let nar = data(300_000, 4);
    let up = upstream(
        vec![("/nar/z.nar".into(), Arc::clone(&nar))],
        Duration::ZERO,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let f = ferry(&up.url, dir.path(), 1 << 30).await;
    let (code, body) = get(&format!("{f}/nar/z.nar")).await;
    assert_eq!(code, 200);
    assert_eq!(&body[..], &nar[..]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        metric(&f, "ferry_substituter_disk_nar_stored_total").await,
        0.0
    );
    assert!(files_in(&dir.path().join("nar")).is_empty());
}

/// Issue 12 item 2: after a restart (routes were in memory only) another upstream's bytes
/// under the same key poisoned the cache. The expected hash is now kept on disk with the
/// route: other bytes are passed on but not kept, the right ones are kept and served.
#[tokio::test]
async fn after_a_restart_a_nar_is_kept_only_against_the_recorded_hash() {
    let nar = data(400_000, 5);
    let other = data(400_000, 6);
    let honest = upstream(
        vec![
            (
                format!("/{H}.narinfo"),
                Arc::new(narinfo(H, "nar/w.nar", &nar).into_bytes()),
            ),
            ("/nar/w.nar".into(), Arc::clone(&nar)),
        ],
        Duration::ZERO,
    )
    .await;
    let liar = upstream(
        vec![("/nar/w.nar".into(), Arc::clone(&other))],
        Duration::ZERO,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let f1 = ferry(&honest.url, dir.path(), 1 << 30).await;
    assert_eq!(get(&format!("{f1}/{H}.narinfo")).await.0, 200);
    let record = dir
        .path()
        .join(ferry_substituter::disk::nar_hash_entry("nar/w.nar"));
    let t = Instant::now();
    while !record.exists() {
        assert!(t.elapsed() < Duration::from_secs(5), "no hash record");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // "Restarted" with the lying upstream: its bytes go to the client, not to the disk.
    let f2 = ferry(&liar.url, dir.path(), 1 << 30).await;
    let (code, body) = get(&format!("{f2}/nar/w.nar")).await;
    assert_eq!(code, 200);
    assert_eq!(&body[..], &other[..]);
    wait_metric(&f2, "ferry_substituter_disk_nar_discarded_total", 1.0).await;
    assert_eq!(
        metric(&f2, "ferry_substituter_disk_nar_stored_total").await,
        0.0
    );

    // Restarted again with the honest one: kept (the hash is known without the narinfo)...
    let f3 = ferry(&honest.url, dir.path(), 1 << 30).await;
    let (code, body) = get(&format!("{f3}/nar/w.nar")).await;
    assert_eq!(code, 200);
    assert_eq!(&body[..], &nar[..]);
    wait_metric(&f3, "ferry_substituter_disk_nar_stored_total", 1.0).await;
    // ...and served from disk, even by an instance that only knows the liar.
    let f4 = ferry(&liar.url, dir.path(), 1 << 30).await;
    let (code, body) = get(&format!("{f4}/nar/w.nar")).await;
    assert_eq!(code, 200);
    assert_eq!(&body[..], &nar[..]);
    assert_eq!(
        metric(&f4, "ferry_substituter_disk_nar_hits_total").await,
        1.0
    );
}
