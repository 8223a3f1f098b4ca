//! NAR requests to plain-`http://` upstreams on a socket of Ferry's own, so that the body can
//! be spliced to the client ([`crate::splice`]) or read into memory, as the stream needs.
//!
//! One request per connection (`Connection: close`): a NAR is large next to a connect on a
//! LAN, and nothing is left to drain or pool. Only what is simple to get right is taken: a
//! `200` or `206` with a `Content-Length`, no `Transfer-Encoding` and no `Content-Encoding`,
//! or a 403/404/410. Anything else (redirects, chunked bodies, other statuses) returns
//! [`RawOpen::NotRaw`] and the caller asks again through reqwest, which handles them.

use super::FetchError;
use bytes::Bytes;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Most bytes of a response head read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;

/// Where plain-HTTP requests of an upstream go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawTarget {
    host: String,
    port: u16,
    /// The `Host` header: the host, and the port when it is not 80.
    host_header: String,
}

impl RawTarget {
    /// For an `http://` base without credentials and without a proxy in the environment
    /// (reqwest honours `http_proxy`/`all_proxy`; this client does not, so it steps aside).
    pub(super) fn new(base: &reqwest::Url, has_credentials: bool) -> Option<RawTarget> {
        let proxied = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if base.scheme() != "http" || has_credentials || proxied || !base.username().is_empty() {
            return None;
        }
        let shown = base.host_str()?.to_owned();
        // IPv6 literals are bracketed in URLs and `Host`, bare for connecting.
        let host = shown
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = base.port_or_known_default()?;
        let host_header = if port == 80 {
            shown
        } else {
            format!("{shown}:{port}")
        };
        Some(RawTarget {
            host,
            port,
            host_header,
        })
    }
}

/// A NAR response whose body is still in the socket.
pub(crate) struct RawBody {
    /// Body bytes that arrived with the head.
    pub(crate) prefix: Bytes,
    pub(crate) sock: TcpStream,
    /// Body bytes still to come from `sock` (after `prefix`).
    pub(crate) left: u64,
}

pub(super) enum RawOpen {
    Opened {
        status: u16,
        content_length: u64,
        content_range: Option<String>,
        body: RawBody,
    },
    Missing,
    /// Not a response this client takes: ask through reqwest.
    NotRaw,
    Failed(FetchError),
}

/// `GET path_and_query` with `Range: bytes=offset-` when `offset > 0`; connects within
/// `connect` and has the head within `wait` after that.
pub(super) async fn open(
    target: &RawTarget,
    path_and_query: &str,
    offset: u64,
    connect: Duration,
    wait: Duration,
) -> RawOpen {
    let sock = match connect_any(target, connect).await {
        Ok(s) => s,
        Err(e) => return RawOpen::Failed(e),
    };
    let _ = sock.set_nodelay(true);
    match tokio::time::timeout(wait, exchange(sock, target, path_and_query, offset)).await {
        Err(_) => RawOpen::Failed(FetchError::Timeout),
        Ok(r) => r,
    }
}

/// How long an address that is not the last one gets before the next is tried: a name with
/// an AAAA record whose IPv6 route black-holes must not cost the whole connect time-out (the
/// 300 ms of hyper's "happy eyeballs", which reqwest uses for the other requests).
const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(300);

/// Connects to the first address of `target` that answers within `connect` overall.
async fn connect_any(target: &RawTarget, connect: Duration) -> Result<TcpStream, FetchError> {
    let deadline = tokio::time::Instant::now() + connect;
    let addrs: Vec<std::net::SocketAddr> = match tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    {
        Err(_) => return Err(FetchError::Timeout),
        Ok(Err(e)) => return Err(FetchError::Connect(e.to_string())),
        Ok(Ok(a)) => a.collect(),
    };
    let mut last = FetchError::Connect(format!("{} has no address", target.host));
    for (i, addr) in addrs.iter().enumerate() {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(FetchError::Timeout);
        }
        let until = if i + 1 == addrs.len() {
            deadline
        } else {
            deadline.min(now + NEXT_ADDRESS_AFTER)
        };
        match tokio::time::timeout_at(until, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = FetchError::Connect(format!("{addr}: {e}")),
            Err(_) => last = FetchError::Timeout,
        }
    }
    Err(last)
}

async fn exchange(
    mut sock: TcpStream,
    target: &RawTarget,
    path_and_query: &str,
    offset: u64,
) -> RawOpen {
    let range = if offset > 0 {
        format!("Range: bytes={offset}-\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ferry-substituter/{}\r\nAccept-Encoding: identity\r\n{range}Connection: close\r\n\r\n",
        target.host_header,
        env!("CARGO_PKG_VERSION")
    );
    if let Err(e) = sock.write_all(req.as_bytes()).await {
        return RawOpen::Failed(FetchError::Transfer(e.to_string()));
    }
    let mut buf = vec![0u8; MAX_HEAD];
    let mut have = 0;
    loop {
        let n = match sock.read(&mut buf[have..]).await {
            Ok(0) => {
                return RawOpen::Failed(FetchError::Transfer(
                    "connection closed before the response head".into(),
                ));
            }
            Ok(n) => n,
            Err(e) => return RawOpen::Failed(FetchError::Transfer(e.to_string())),
        };
        have += n;
        match parse_head(&buf[..have]) {
            Head::Partial if have == buf.len() => {
                return RawOpen::Failed(FetchError::Transfer(format!(
                    "response head over {MAX_HEAD} bytes"
                )));
            }
            Head::Partial => continue,
            Head::Bad(why) => return RawOpen::Failed(FetchError::Transfer(why)),
            Head::Missing => return RawOpen::Missing,
            Head::Other => return RawOpen::NotRaw,
            Head::Body {
                status,
                len,
                content_range,
                head_len,
            } => {
                let prefix = Bytes::copy_from_slice(&buf[head_len..have]);
                let Some(left) = len.checked_sub(prefix.len() as u64) else {
                    return RawOpen::Failed(FetchError::Transfer(
                        "upstream sent more bytes than its Content-Length".into(),
                    ));
                };
                return RawOpen::Opened {
                    status,
                    content_length: len,
                    content_range,
                    body: RawBody { prefix, sock, left },
                };
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    Partial,
    Bad(String),
    Missing,
    Other,
    Body {
        status: u16,
        len: u64,
        content_range: Option<String>,
        head_len: usize,
    },
}

/// Reads a response head (pure, for the tests).
fn parse_head(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(e) => return Head::Bad(format!("bad response head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    if matches!(status, 403 | 404 | 410) {
        return Head::Missing;
    }
    if status != 200 && status != 206 {
        return Head::Other;
    }
    let mut len = None;
    let mut content_range = None;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match (len, value.parse::<u64>()) {
                (None, Ok(v)) => len = Some(v),
                // Two lengths, or one that is not a number: nothing to trust.
                _ => return Head::Bad(format!("bad Content-Length {value:?}")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-encoding")
                && !value.eq_ignore_ascii_case("identity"))
        {
            // A framing or an encoding to undo: reqwest's to handle.
            return Head::Other;
        } else if h.name.eq_ignore_ascii_case("content-range") {
            content_range = Some(value.to_owned());
        }
    }
    match len {
        Some(len) => Head::Body {
            status,
            len,
            content_range,
            head_len,
        },
        None => Head::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let ok = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 12\r\n\r\nabc";
        assert_eq!(
            parse_head(ok),
            Head::Body {
                status: 200,
                len: 12,
                content_range: None,
                head_len: ok.len() - 3
            }
        );
        assert_eq!(parse_head(&ok[..20]), Head::Partial);
        let part =
            b"HTTP/1.1 206 Partial Content\r\ncontent-range: bytes 5-9/10\r\ncontent-length: 5\r\n\r\n";
        assert!(matches!(
            parse_head(part),
            Head::Body { status: 206, len: 5, content_range: Some(ref r), .. } if r == "bytes 5-9/10"
        ));
        assert_eq!(parse_head(b"HTTP/1.1 404 Not Found\r\n\r\n"), Head::Missing);
        assert_eq!(parse_head(b"HTTP/1.1 403 Forbidden\r\n\r\n"), Head::Missing);
        for other in [
            &b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n"[..],
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(other),
                Head::Other,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Head::Bad(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn targets() {
        let t = |u: &str| RawTarget::new(&reqwest::Url::parse(u).unwrap(), false);
        let a = t("http://cache.lan:8080/sub").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.host_header.as_str()),
            ("cache.lan", 8080, "cache.lan:8080")
        );
        let b = t("http://[::1]/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.host_header.as_str()),
            ("::1", 80, "[::1]")
        );
        assert_eq!(t("https://cache.lan"), None);
        assert_eq!(t("http://u:p@cache.lan"), None);
        assert_eq!(
            RawTarget::new(&reqwest::Url::parse("http://cache.lan").unwrap(), true),
            None
        );
    }
}
