//! Ferry in-process against programmable HTTP upstreams (delay, status, Retry-After, bodies
//! that fail mid-stream): coalescing, the priority race, deadlines, breakers and NAR resume,
//! with timings that would be too slow or too flaky to drive through Nix on the fleet.

mod common;

use axum::body::Body;
use axum::http::{HeaderMap, Response, Uri};
use bytes::Bytes;
use common::{
    H, check_range_from, head, narinfo_text, settings, spawn_app, spawn_ferry, status,
    trust_anything,
};
use ferry_nix::hash::Hash;
use ferry_substituter::config::{SubstituterConfig, UpstreamConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn narinfo(hash: &str, tag: &str) -> String {
    narinfo_text(
        hash,
        &format!("nar/{tag}.nar"),
        &Hash::sha256_of(b"nar"),
        120,
    )
}

type Behaviour = Arc<dyn Fn(&str, &HeaderMap, usize) -> Response<Body> + Send + Sync>;

struct Mock {
    url: String,
    hits: Arc<AtomicUsize>,
}

/// An upstream whose answer to each request comes from `f(path, headers, request number)`,
/// after `delay`.
async fn mock(delay: Duration, f: Behaviour) -> Mock {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let f = Arc::clone(&f);
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            f(uri.path(), &headers, n)
        }
    });
    let url = format!("http://{}", spawn_app(app).await);
    Mock { url, hits }
}

fn hit(tag: &'static str) -> Behaviour {
    Arc::new(move |path, _, _| {
        match path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix(".narinfo"))
        {
            Some(h) => status(200, narinfo(h, tag)),
            None => status(404, ""),
        }
    })
}

/// Starts Ferry with these upstreams (in priority order) and returns its base URL.
async fn ferry(upstreams: &[&str], tune: impl FnOnce(&mut SubstituterConfig)) -> String {
    let mut c = SubstituterConfig {
        upstream: upstreams.iter().map(|u| UpstreamConfig::new(u)).collect(),
        head_start_ms: 50,
        ..SubstituterConfig::default()
    };
    tune(&mut c);
    format!(
        "http://{}",
        spawn_ferry(settings(c, trust_anything())).await
    )
}

/// Asks Ferry at `f` for the narinfo of `hash`; checks that it is upstream `tag`'s hit and
/// returns how long the answer took.
async fn served(f: &str, hash: &str, tag: &str) -> Duration {
    let t = Instant::now();
    let (code, body) = get(&format!("{f}/{hash}.narinfo")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("URL: nar/{tag}.nar")), "{body}");
    t.elapsed()
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("request to Ferry");
    let code = r.status().as_u16();
    (code, r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_upstream_request() {
    let a = mock(Duration::from_millis(200), hit("a")).await;
    let f = ferry(&[&a.url], |_| {}).await;
    let url = format!("{f}/{H}.narinfo");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn({
                let url = url.clone();
                async move { get(&url).await }
            })
        })
        .collect();
    for t in tasks {
        let (code, body) = t.await.expect("task");
        assert_eq!(code, 200);
        assert_eq!(body, narinfo(H, "a"));
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
    // Warm: served from memory.
    assert_eq!(get(&url).await.0, 200);
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn higher_priority_hit_beats_an_earlier_lower_priority_hit() {
    let a = mock(Duration::from_millis(400), hit("a")).await;
    let b = mock(Duration::ZERO, hit("b")).await;
    let f = ferry(&[&a.url, &b.url], |_| {}).await;
    let e = served(&f, H, "a").await;
    assert!(e >= Duration::from_millis(400));
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        1,
        "b was raced after its head start"
    );
}

#[tokio::test]
async fn at_the_deadline_a_lower_priority_hit_is_served() {
    let a = mock(Duration::from_secs(5), hit("a")).await;
    let b = mock(Duration::ZERO, hit("b")).await;
    let f = ferry(&[&a.url, &b.url], |c| {
        c.narinfo_deadline_ms = 600;
        c.upstream[0].read_timeout_ms = 10_000;
    })
    .await;
    let e = served(&f, H, "b").await;
    assert!(
        e >= Duration::from_millis(550) && e < Duration::from_secs(2),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_refused_first_upstream_costs_little() {
    let b = mock(Duration::ZERO, hit("b")).await;
    // Port 1 on loopback refuses at once.
    // A long head start, so that waiting for it would be unmistakable even on a loaded machine.
    let f = ferry(&["http://127.0.0.1:1", &b.url], |c| c.head_start_ms = 3000).await;
    let e = served(&f, H, "b").await;
    // The next upstream starts as soon as the first fails, not after the head start.
    assert!(e < Duration::from_millis(1500), "{e:?}");
}

#[tokio::test]
async fn retry_after_opens_the_breaker_and_errors_are_not_negative_cached() {
    let a = mock(
        Duration::ZERO,
        Arc::new(|_, _, _| {
            let mut r = status(503, "slow down");
            r.headers_mut()
                .insert("retry-after", "30".parse().expect("header"));
            r
        }),
    )
    .await;
    let b = mock(Duration::ZERO, Arc::new(|_, _, _| status(404, ""))).await;
    let f = ferry(&[&a.url, &b.url], |_| {}).await;
    let url = format!("{f}/{H}.narinfo");
    assert_eq!(get(&url).await.0, 404);
    assert_eq!(get(&url).await.0, 404);
    // The miss was incomplete (a failed), so it was not cached: b was asked twice; a once,
    // then skipped while its breaker honours Retry-After.
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
    let (_, m) = get(&format!("{f}/metrics")).await;
    assert!(
        m.contains(&format!(
            "ferry_substituter_upstream_breaker_state{{upstream=\"{}\"}} 1",
            a.url
        )),
        "{m}"
    );
    assert!(
        m.contains("ferry_substituter_negative_cache_hits_total 0\n"),
        "{m}"
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_opens_the_breaker() {
    let a = mock(
        Duration::ZERO,
        Arc::new(|_, _, _| {
            let mut r = status(503, "slow down");
            r.headers_mut().insert(
                "retry-after",
                "Fri, 01 Jan 2100 00:00:00 GMT".parse().expect("header"),
            );
            r
        }),
    )
    .await;
    let b = mock(Duration::ZERO, hit("b")).await;
    let f = ferry(&[&a.url, &b.url], |c| {
        // One failure alone must not open it: only Retry-After does.
        c.upstream[0].breaker_failures = 10;
        c.positive_ttl_secs = 0;
    })
    .await;
    for _ in 0..3 {
        let (code, body) = get(&format!("{f}/{H}.narinfo")).await;
        assert_eq!(code, 200);
        assert!(body.contains("nar/b.nar"), "{body}");
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        1,
        "asked again while told to wait"
    );
}

#[tokio::test]
async fn wrong_path_and_garbage_are_upstream_failures() {
    let a = mock(
        Duration::ZERO,
        Arc::new(|_, _, n| {
            if n % 2 == 0 {
                status(200, narinfo("1c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig", "wrong"))
            } else {
                status(200, "<html>hello</html>\n")
            }
        }),
    )
    .await;
    let b = mock(Duration::ZERO, hit("b")).await;
    let f = ferry(&[&a.url, &b.url], |c| c.positive_ttl_secs = 0).await;
    for _ in 0..2 {
        let (code, body) = get(&format!("{f}/{H}.narinfo")).await;
        assert_eq!(code, 200);
        assert!(body.contains("nar/b.nar"), "{body}");
    }
}

#[tokio::test]
async fn definitive_misses_are_cached() {
    let a = mock(Duration::ZERO, Arc::new(|_, _, _| status(404, ""))).await;
    let b = mock(Duration::ZERO, Arc::new(|_, _, _| status(410, ""))).await;
    let f = ferry(&[&a.url, &b.url], |_| {}).await;
    for _ in 0..3 {
        assert_eq!(get(&format!("{f}/{H}.narinfo")).await.0, 404);
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
}

/// A NAR of `len` bytes that honours `Range`; its first full (non-range) response fails after
/// `cut` bytes.
fn flaky_nar(data: Arc<Vec<u8>>, cut: usize) -> Behaviour {
    Arc::new(move |path, headers, n| {
        if !path.starts_with("/nar/") {
            return status(404, "");
        }
        let range = headers
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let start: usize = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let total = data.len();
        let body = Bytes::copy_from_slice(&data[start..]);
        let mut r = if n == 0 {
            let first = body.slice(..cut);
            let stream = futures_util::stream::iter(vec![
                Ok::<_, std::io::Error>(first),
                Err(std::io::Error::other("upstream died")),
            ]);
            status(200, Body::from_stream(stream))
        } else if start > 0 {
            let mut r = status(206, body);
            r.headers_mut().insert(
                "content-range",
                format!("bytes {start}-{}/{total}", total - 1)
                    .parse()
                    .expect("header"),
            );
            r
        } else {
            status(200, body)
        };
        let len = total - start;
        r.headers_mut()
            .insert("content-length", len.to_string().parse().expect("header"));
        r
    })
}

#[tokio::test]
async fn nar_resumes_with_range_from_the_same_upstream() {
    let data: Arc<Vec<u8>> = Arc::new((0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect());
    let a = mock(Duration::ZERO, flaky_nar(Arc::clone(&data), 1_000_000)).await;
    let f = ferry(&[&a.url], |_| {}).await;
    let r = reqwest::get(format!("{f}/nar/x.nar")).await.expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.content_length(), Some(3_000_000));
    let body = r.bytes().await.expect("complete body");
    assert!(body[..] == data[..], "body differs");
    assert_eq!(a.hits.load(Ordering::SeqCst), 2, "one failure, one resume");
    let (_, m) = get(&format!("{f}/metrics")).await;
    assert!(m.contains("ferry_substituter_nar_resumes_total 1\n"), "{m}");
    // Both the first body and the resumed one were spliced (an HTTP/1 client, a plain-HTTP
    // upstream, no disk cache), all but what arrived in the same reads as the heads.
    let spliced: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_substituter_nar_spliced_bytes_total "))
        .and_then(|v| v.parse().ok())
        .expect("spliced bytes metric");
    assert!(spliced > 2_500_000 && spliced <= 3_000_000, "{m}");
}

#[tokio::test]
async fn file_upstream_serves_narinfo_nar_ranges_and_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("nar")).expect("nar dir");
    std::fs::create_dir_all(dir.path().join("log")).expect("log dir");
    std::fs::write(dir.path().join(format!("{H}.narinfo")), narinfo(H, "f")).expect("narinfo");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("nar/f.nar"), &data).expect("nar");
    std::fs::write(dir.path().join("log/abc-foo.drv"), "build log\n").expect("log");
    let url = format!("file://{}", dir.path().display());
    let f = ferry(&[&url], |_| {}).await;

    let (code, body) = get(&format!("{f}/{H}.narinfo")).await;
    assert_eq!((code, body), (200, narinfo(H, "f")));
    let r = reqwest::get(format!("{f}/nar/f.nar")).await.expect("nar");
    assert_eq!(
        r.headers().get("accept-ranges").map(|v| v.as_bytes()),
        Some(&b"bytes"[..])
    );
    assert_eq!(r.bytes().await.expect("body")[..], data[..]);
    check_range_from(&format!("{f}/nar/f.nar"), &data, 999_990).await;
    let r = head(&format!("{f}/nar/f.nar")).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers().get("content-length").map(|v| v.as_bytes()),
        Some(&b"1000000"[..])
    );
    assert_eq!(
        get(&format!("{f}/log/abc-foo.drv")).await,
        (200, "build log\n".to_owned())
    );
    assert_eq!(get(&format!("{f}/log/missing.drv")).await.0, 404);
    assert_eq!(get(&format!("{f}/nar/missing.nar")).await.0, 404);
    // Traversal out of the cache directory is not even routed.
    assert_eq!(get(&format!("{f}/nar/..%2F..%2Fetc%2Fpasswd")).await.0, 404);
}

/// An upstream that accepts and at once closes its first `drop_first` connections (what a
/// client sees from a server whose backlog overflowed mid-handshake, or that was restarting),
/// then answers every narinfo request with a hit, one request per connection. Returns its URL
/// and the number of connections accepted.
async fn closes_first_connections(drop_first: usize) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            if count.fetch_add(1, Ordering::SeqCst) < drop_first {
                drop(s);
                continue;
            }
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let path = line.split(' ').nth(1).unwrap_or("");
                let resp = match path
                    .strip_prefix('/')
                    .and_then(|p| p.strip_suffix(".narinfo"))
                {
                    Some(h) => {
                        let body = narinfo(h, "c");
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    None => {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_owned()
                    }
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn a_connection_closed_by_the_only_healthy_upstream_is_retried_not_a_404() {
    // The end-to-end failure: the first upstream is down, the only one with the path drops a
    // connection. Without a retry all slots fail and Nix caches the 404 for an hour.
    let (c, accepted) = closes_first_connections(2).await;
    let f = ferry(&["http://127.0.0.1:1", &c], |_| {}).await;
    let e = served(&f, H, "c").await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "two closed, then answered"
    );
    assert!(e < Duration::from_secs(2), "{e:?}");
    let (_, m) = get(&format!("{f}/metrics")).await;
    assert!(
        m.contains(&format!(
            "ferry_substituter_upstream_retries_total{{upstream=\"{c}\"}} 2\n"
        )),
        "{m}"
    );
}

#[tokio::test]
async fn a_503_once_is_retried_not_a_404() {
    let a = mock(
        Duration::ZERO,
        Arc::new(|path, h, n| {
            if n == 0 {
                status(503, "busy")
            } else {
                hit("a")(path, h, n)
            }
        }),
    )
    .await;
    let b = mock(Duration::ZERO, Arc::new(|_, _, _| status(404, ""))).await;
    let f = ferry(&[&a.url, &b.url], |_| {}).await;
    let (code, body) = get(&format!("{f}/{H}.narinfo")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("URL: nar/a.nar"), "{body}");
    assert_eq!(a.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_permanently_failing_upstream_gives_a_quick_404_and_no_retries_once_its_breaker_opens() {
    let a = mock(Duration::ZERO, Arc::new(|_, _, _| status(500, "broken"))).await;
    let b = mock(Duration::ZERO, Arc::new(|_, _, _| status(404, ""))).await;
    let f = ferry(&[&a.url, &b.url], |c| {
        // Two failures open it: the first retry opens it, so a second retry would be a bug.
        c.upstream[0].breaker_failures = 2;
        c.upstream[0].breaker_cooldown_ms = 60_000;
    })
    .await;
    let url = format!("{f}/{H}.narinfo");
    let t = Instant::now();
    assert_eq!(get(&url).await.0, 404);
    let e = t.elapsed();
    assert!(
        e < Duration::from_millis(1500),
        "within the 2 s deadline: {e:?}"
    );
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        2,
        "one retry, then its breaker opened"
    );
    // Open breaker: skipped, not retried, and the 404 comes at once.
    let t = Instant::now();
    assert_eq!(get(&url).await.0, 404);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(a.hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        2,
        "incomplete 404s are not cached"
    );
}

#[tokio::test]
async fn retrying_a_hanging_first_upstream_does_not_delay_a_lower_priority_hit() {
    // a times out at about 200 + 300 ms (connect and read time-outs) and is retried; b's hit
    // arrives after that first failure and must be served at once, not after a's retries
    // (which end near 1.7 s).
    let a = mock(Duration::from_secs(10), hit("a")).await;
    let b = mock(Duration::from_millis(600), hit("b")).await;
    let f = ferry(&[&a.url, &b.url], |c| c.upstream[0].read_timeout_ms = 300).await;
    let e = served(&f, H, "b").await;
    assert!(e < Duration::from_millis(1400), "{e:?}");
}

#[tokio::test]
async fn after_a_first_failure_a_hanging_upstream_no_longer_holds_back_lower_priority_hits() {
    // a hangs (its read time-out, 1 s, is its failure); b answers at once. The first lookup
    // waits for a's failure; the next ones, while a's breaker is still closed (3 failures open
    // it), must not wait for a again: a is suspect and b's hit is served at once.
    let a = mock(Duration::from_secs(10), hit("a")).await;
    let b = mock(Duration::ZERO, hit("b")).await;
    let f = ferry(&[&a.url, &b.url], |c| {
        c.upstream[0].read_timeout_ms = 1000;
        c.narinfo_deadline_ms = 5000;
    })
    .await;
    let e = served(&f, H, "b").await;
    assert!(e >= Duration::from_millis(900), "{e:?}");
    let other = "1c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig";
    let e = served(&f, other, "b").await;
    assert!(
        e < Duration::from_millis(700),
        "waited for the suspect upstream: {e:?}"
    );
    // It was still asked (its answer would count if it came).
    assert!(a.hits.load(Ordering::SeqCst) >= 2);
}

/// HTTP/2 copies body frames into its own: over h2c, NAR bytes are read into memory and sent
/// as they are, never spliced (a spliced placeholder there would put zeros on the wire).
#[tokio::test]
async fn an_http2_client_gets_the_nar_bytes_not_placeholders() {
    let data: Arc<Vec<u8>> = Arc::new((0..2_000_000u32).map(|i| (i * 13 % 251) as u8).collect());
    // Cut after the whole file: the first request is served whole (then "dies" at the end).
    let a = mock(Duration::ZERO, flaky_nar(Arc::clone(&data), 2_000_000)).await;
    let f = ferry(&[&a.url], |_| {}).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let fetch = async {
        let r = h2.get(format!("{f}/nar/x.nar")).send().await.expect("get");
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.expect("complete body")
    };
    // A placeholder on HTTP/2 would never be drained: the stream would hang.
    let body = tokio::time::timeout(Duration::from_secs(20), fetch)
        .await
        .expect("NAR over HTTP/2 within 20 s");
    assert!(body[..] == data[..], "body differs");
    let (_, m) = get(&format!("{f}/metrics")).await;
    assert!(
        m.contains("ferry_substituter_nar_spliced_bytes_total 0\n"),
        "{m}"
    );
}

/// An upstream that sends NARs chunked (no `Content-Length`) is not one Ferry's own HTTP/1
/// requests take: the NAR is asked again through reqwest and served whole, not spliced.
#[tokio::test]
async fn a_chunked_upstream_nar_is_served_through_the_general_client() {
    let data: Arc<Vec<u8>> = Arc::new((0..1_500_000u32).map(|i| (i * 17 % 251) as u8).collect());
    let d = Arc::clone(&data);
    let a = mock(
        Duration::ZERO,
        Arc::new(move |path, _, _| {
            if !path.starts_with("/nar/") {
                return status(404, "");
            }
            let parts: Vec<Result<Bytes, std::io::Error>> = d
                .chunks(100_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            status(200, Body::from_stream(futures_util::stream::iter(parts)))
        }),
    )
    .await;
    let f = ferry(&[&a.url], |_| {}).await;
    let r = reqwest::get(format!("{f}/nar/x.nar")).await.expect("get");
    assert_eq!(r.status().as_u16(), 200);
    let body = r.bytes().await.expect("complete body");
    assert!(body[..] == data[..], "body differs");
    // Asked once on Ferry's own connection (refused as chunked), once through reqwest.
    assert_eq!(a.hits.load(Ordering::SeqCst), 2);
    let (_, m) = get(&format!("{f}/metrics")).await;
    assert!(
        m.contains("ferry_substituter_nar_spliced_bytes_total 0\n"),
        "{m}"
    );
}
