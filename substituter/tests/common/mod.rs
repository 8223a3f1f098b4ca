//! Helpers shared by the substituter's integration tests: Ferry in process, mock upstreams,
//! raw HTTP requests. Every test binary compiles this module and uses only part of it, hence
//! the `dead_code` allowance.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Response, StatusCode};
use ferry_nix::hash::Hash;
use ferry_substituter::Settings;
use ferry_substituter::config::{NixTrust, Overrides, SubstituterConfig};
use std::io::{Read as _, Write as _};
use std::time::Duration;

/// A store path hash part the mock upstreams answer for.
pub(crate) const H: &str = "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig";

/// A narinfo for `/nix/store/<hash>-hello` with no references and no signature.
pub(crate) fn narinfo_text(hash: &str, url: &str, nar_hash: &Hash, nar_size: usize) -> String {
    format!(
        "StorePath: /nix/store/{hash}-hello\nURL: {url}\nCompression: none\nNarHash: {}\nNarSize: {nar_size}\nReferences: \n",
        nar_hash.to_nix32_prefixed()
    )
}

pub(crate) fn status(code: u16, body: impl Into<Body>) -> Response<Body> {
    let mut r = Response::new(body.into());
    *r.status_mut() = StatusCode::from_u16(code).expect("status");
    r
}

/// Serves `app` on a free local port; returns its address (`127.0.0.1:port`).
pub(crate) async fn spawn_app(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    addr.to_string()
}

/// A Nix that takes any narinfo, for tests about the race or the cache rather than trust.
pub(crate) fn trust_anything() -> NixTrust {
    NixTrust {
        trusted_public_keys: String::new(),
        require_sigs: false,
    }
}

/// Resolves `c` as if the local Nix said `trust`; panics on a bad setting.
pub(crate) fn settings(c: SubstituterConfig, trust: NixTrust) -> Settings {
    ferry_substituter::install_crypto_provider();
    c.resolve(&Overrides::default(), |_| Ok(trust))
        .expect("settings")
}

/// Runs Ferry in process on a free local port; returns its address (`127.0.0.1:port`).
pub(crate) async fn spawn_ferry(s: Settings) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(ferry_substituter::run(s, l, std::future::pending()));
    addr.to_string()
}

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// The whole response as text (head and body).
    pub(crate) fn text(&self) -> String {
        format!("{}{}", self.head, String::from_utf8_lossy(&self.body))
    }
}

/// A raw HTTP/1.1 request, so that the target reaches Ferry exactly as written (an HTTP
/// client library would resolve `%2e%2e` itself). Reads to the end of the connection (or
/// `timeout` without a byte), so a body shorter than `Content-Length` shows.
pub(crate) async fn raw(
    addr: &str,
    method: &str,
    target: &str,
    extra: &str,
    timeout: Duration,
) -> Resp {
    let request =
        format!("{method} {target} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n{extra}\r\n");
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(timeout)).expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        split(out)
    })
    .await
    .expect("raw")
}

pub(crate) fn split(out: Vec<u8>) -> Resp {
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Resp {
        status,
        head,
        body: out[end..].to_vec(),
    }
}

/// GETs `url` from byte `from` on and checks the partial answer: a 206, its `Content-Range`,
/// and the bytes of `whole` from `from`.
pub(crate) async fn check_range_from(url: &str, whole: &[u8], from: usize) {
    let r = reqwest::Client::new()
        .get(url)
        .header("range", format!("bytes={from}-"))
        .send()
        .await
        .expect("range");
    assert_eq!(r.status().as_u16(), 206);
    let want = format!("bytes {from}-{}/{}", whole.len() - 1, whole.len());
    assert_eq!(
        r.headers().get("content-range").map(|v| v.as_bytes()),
        Some(want.as_bytes())
    );
    assert_eq!(r.bytes().await.expect("body")[..], whole[from..]);
}

pub(crate) async fn head(url: &str) -> reqwest::Response {
    reqwest::Client::new().head(url).send().await.expect("head")
}
