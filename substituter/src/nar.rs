//! NAR pass-through: streamed, never buffered whole, never silently truncated.
//!
//! Candidates are the upstream whose narinfo named this NAR (remembered by the lookup), then
//! every other upstream in priority order (the same relative key names the same file on every
//! Nix-written cache, and after a restart Ferry has no memory of routes: docs/binary-cache.md §1.4, §5.1 rule 5).
//! Nothing served before the first byte means 404. Once the headers are out, a failing upstream
//! (error, early end, idle time-out) is replaced by resuming at the current offset with `Range`
//! from the same upstream (if it made progress) or the next candidate; an upstream that ignores
//! `Range` is read from the start and the prefix dropped. When no candidate can continue, the
//! body ends with an error, which makes hyper abort the connection: the client sees a short body
//! against its `Content-Length`, never a clean end (docs/binary-cache.md §5.1 rule 6; ncro#77, attic#124).

use crate::server::State;
use crate::splice::SpliceConn;
use crate::upstream::{NarBody, NarStream, OpenNar};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use bytes::Bytes;
use futures_util::StreamExt as _;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

/// Parses a single `Range: bytes=a-` or `bytes=a-b`. Other forms (suffix, multiple ranges) are
/// ignored, which RFC 9110 allows: the whole file is sent with 200.
pub(crate) fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => None,
        b => Some(b.parse().ok()?),
    };
    match end {
        Some(e) if e < start => None,
        _ => Some((start, end)),
    }
}

/// The upstreams to try, in order: the one that served the narinfo first.
fn candidates(state: &Arc<State>, first: Option<usize>) -> Vec<usize> {
    let mut v: Vec<usize> = first.into_iter().collect();
    v.extend((0..state.upstreams.len()).filter(|i| Some(*i) != first));
    v
}

fn not_found() -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// The response head for a file of `total` bytes (if known) and the requested range: status,
/// `Content-Length`, `Content-Range`, `Accept-Ranges`.
pub(crate) fn frame(range: Option<(u64, Option<u64>)>, total: Option<u64>) -> Framed {
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    if total.is_some() {
        // Lets Nix resume by itself too (`Accept-Ranges` and no `Content-Encoding`, docs/binary-cache.md §2.2).
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    let end_excl = match (range, total) {
        (Some((s, e)), Some(t)) => {
            if s >= t {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{t}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Framed::Answered(r);
            }
            let last = e.map_or(t - 1, |e| e.min(t - 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{last}/{t}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(last + 1 - s));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            Some(last + 1)
        }
        // A range on a file of unknown length: serve it whole.
        (Some(_), None) => None,
        (None, t) => {
            if let Some(t) = t {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(t));
            }
            t
        }
    };
    Framed::Body(resp, end_excl)
}

pub(crate) enum Framed {
    /// The head, and the offset to stop at (exclusive).
    Body(Response<Body>, Option<u64>),
    /// A complete answer (416).
    Answered(Response<Body>),
}

/// `splice`: the connection's pipe, for HTTP/1 requests ([`crate::splice`]).
pub(crate) async fn serve(
    state: Arc<State>,
    key: String,
    method: &Method,
    headers: &HeaderMap,
    splice: Option<Arc<SpliceConn>>,
) -> Response<Body> {
    state.metrics.nar_requests.inc();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range);
    let start = range.map_or(0, |r| r.0);
    let head = method == Method::HEAD;

    // What the file must be: from the narinfo Ferry served (in memory), else from the record
    // kept with the disk cache (it survives restarts).
    let route = state.routes.get(&key).await;
    let expect = match (&route, &state.disk) {
        (Some(r), _) if r.expect.sha256.is_some() => Some(r.expect.clone()),
        (_, Some(d)) => d.expected(&key).await,
        _ => None,
    };
    // The disk cache first: no upstream is asked for a NAR Ferry already holds, checked
    // against that hash on the way in.
    if let (Some(disk), Some(expect)) = (&state.disk, &expect)
        && let Some((file, len)) = disk.open_nar(&key, expect).await
    {
        disk.metrics.nar_hits.inc();
        return serve_file(&state, file, len, range, head, splice).await;
    }

    let order = candidates(&state, route.as_ref().and_then(|r| r.upstream));
    // Open the first candidate that has the file. When none said "missing" or opened it but a
    // live one failed transiently (a busy upstream dropping SYNs under Nix's parallel
    // downloads), go round again with patient connects until `narinfo-patience-ms`: a 404
    // here fails the substitution of a path the upstream holds (issue 12, never a false miss).
    let started = std::time::Instant::now();
    let mut opened = None;
    let mut patient = false;
    let mut round = 0usize;
    'rounds: loop {
        let mut transient = false;
        for (pos, &i) in order.iter().enumerate() {
            let up = &state.upstreams[i];
            if up.admit().is_err() {
                continue;
            }
            let attempt_start = std::time::Instant::now();
            let _slot = up.slot().await;
            let r = if head {
                up.head_nar(&key, patient).await
            } else {
                up.open_nar_attempt(&key, start, patient).await
            };
            match r {
                OpenNar::Opened(body) => {
                    up.record_success();
                    opened = Some((pos, body));
                    break 'rounds;
                }
                OpenNar::Missing => up.record_success(),
                OpenNar::Failed(error) => {
                    tracing::warn!(upstream = %up.settings.display, %key, %error, patient, "NAR open failed");
                    up.record_failure_since(attempt_start, None);
                    transient |=
                        error.kind() == crate::race::FailureKind::Transient && up.breaker_closed();
                }
            }
        }
        let backoff = crate::race::RETRY_BACKOFFS[round.min(crate::race::RETRY_BACKOFFS.len() - 1)];
        let fits = started.elapsed() + backoff + crate::upstream::PATIENT_CONNECT_MIN
            <= state.settings.narinfo_patience;
        if !transient || !fits {
            break;
        }
        tokio::time::sleep(backoff).await;
        patient = true;
        round += 1;
    }
    let Some((pos, body)) = opened else {
        state.metrics.nar_not_found.inc();
        return not_found();
    };

    let total = body.total;
    let (mut resp, end_excl) = match frame(range, total) {
        Framed::Body(r, e) => (r, e),
        Framed::Answered(r) => return r,
    };
    if head {
        return resp;
    }
    let from = if range.is_some() && total.is_some() {
        start
    } else {
        0
    };
    let body = if from != start {
        // The range was dropped (unknown length) but the upstream was opened at `start`.
        match state.upstreams[order[pos]].open_nar(&key, 0).await {
            OpenNar::Opened(b) => b,
            _ => {
                state.metrics.nar_not_found.inc();
                return not_found();
            }
        }
    } else {
        body
    };
    // A copy for the disk cache: only whole files of known length and known expected hash,
    // verified before commit.
    let writer = match (&state.disk, range, total, expect) {
        (Some(d), None, Some(t), Some(e)) => d.nar_writer(&key, t, e),
        _ => None,
    };
    // Splice only what needs no copy in memory: not the disk cache's. (The pipe is made
    // when a socket body is first spliced, not for HTTPS or S3 bodies.)
    let splice = splice.filter(|_| writer.is_none());
    let pump = Pump {
        splice,
        excluded: vec![false; order.len()],
        state: Arc::clone(&state),
        key,
        order,
        current: pos,
        pos: from,
        opened_at: from,
        end: end_excl,
        total,
        body: Some(body),
        writer,
    };
    // The body is polled directly by hyper: no task or channel between upstream and client.
    let stream = futures_util::stream::unfold(pump, |mut p| async move {
        p.next_chunk().await.map(|item| (item, p))
    });
    *resp.body_mut() = Body::from_stream(stream);
    resp
}

/// A NAR from the disk cache, with `Range` (a failed read aborts the connection).
async fn serve_file(
    state: &Arc<State>,
    mut file: tokio::fs::File,
    len: u64,
    range: Option<(u64, Option<u64>)>,
    head: bool,
    splice: Option<Arc<SpliceConn>>,
) -> Response<Body> {
    let (mut resp, end) = match frame(range, Some(len)) {
        Framed::Body(r, e) => (r, e),
        Framed::Answered(r) => return r,
    };
    if head {
        return resp;
    }
    let start = range.map_or(0, |r| r.0);
    if start > 0
        && let Err(e) = file.seek(io::SeekFrom::Start(start)).await
    {
        tracing::warn!(error = %e, "disk cache seek failed");
        return not_found();
    }
    let remaining = end.unwrap_or(len).saturating_sub(start);
    if let Some(conn) = splice.filter(|c| c.available()) {
        // File → pipe → socket: the page cache's pages go out without a copy, as with
        // nginx's `sendfile`.
        let file = Arc::new(file.into_std().await);
        let state = Arc::clone(state);
        let stream = futures_util::stream::unfold(remaining, move |left| {
            let (state, conn, file) = (Arc::clone(&state), Arc::clone(&conn), Arc::clone(&file));
            async move {
                if left == 0 {
                    return None;
                }
                conn.drained().await;
                let max = left.min(crate::splice::MAX_FRAME as u64) as usize;
                // A read from disk may block: off the runtime's thread.
                let filled = tokio::task::spawn_blocking(move || conn.fill_from_file(&file, max))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                match filled {
                    Ok(0) => Some((Err(io::Error::other("disk cache file truncated")), 0)),
                    Ok(n) => {
                        state.metrics.nar_bytes.add(n as u64);
                        Some((Ok(crate::splice::placeholder(n)), left - n as u64))
                    }
                    Err(e) => Some((Err(e), 0)),
                }
            }
        });
        *resp.body_mut() = Body::from_stream(stream);
        return resp;
    }
    let state = Arc::clone(state);
    let stream = futures_util::stream::unfold((file, remaining), move |(mut f, left)| {
        let state = Arc::clone(&state);
        async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0u8; FILE_CHUNK.min(left as usize)];
            match f.read(&mut buf).await {
                // The file shrank under us: abort rather than end early.
                Ok(0) => Some((Err(io::Error::other("disk cache file truncated")), (f, 0))),
                Ok(n) => {
                    buf.truncate(n);
                    state.metrics.nar_bytes.add(n as u64);
                    Some((Ok(Bytes::from(buf)), (f, left - n as u64)))
                }
                Err(e) => Some((Err(e), (f, 0))),
            }
        }
    });
    *resp.body_mut() = Body::from_stream(stream);
    resp
}

const FILE_CHUNK: usize = 256 * 1024;
/// Most bytes read at once from an upstream socket that is not spliced.
const SOCKET_CHUNK: usize = 256 * 1024;

struct Pump {
    state: Arc<State>,
    key: String,
    /// Upstream indices in the order to try.
    order: Vec<usize>,
    /// Candidates (indices into `order`) that failed without progress: not asked again.
    excluded: Vec<bool>,
    /// Index into `order` of the upstream being read.
    current: usize,
    /// Absolute offset of the next byte to send.
    pos: u64,
    /// Offset to stop at (exclusive), when known.
    end: Option<u64>,
    total: Option<u64>,
    /// None once the stream is finished or aborted.
    body: Option<NarBody>,
    /// `pos` when `body` was opened, to tell whether it made progress.
    opened_at: u64,
    /// The disk cache's copy of this stream, if one is being made.
    writer: Option<crate::disk::NarWriter>,
    /// The client connection's pipe: socket bodies are spliced through it.
    splice: Option<Arc<SpliceConn>>,
}

enum Read {
    Chunk(Bytes),
    /// This many bytes were spliced into the connection's pipe.
    Spliced(usize),
    Done,
    Failed(String),
}

impl Pump {
    /// The next chunk for the client: `None` at the end, `Some(Err)` to abort the connection.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, io::Error>> {
        loop {
            let mut body = self.body.take()?;
            match self.read(&mut body).await {
                Read::Chunk(c) => {
                    self.body = Some(body);
                    if let Some(w) = &self.writer
                        && !w.write(c.clone()).await
                    {
                        self.writer = None;
                    }
                    // Commit as soon as the last byte is read, not when hyper polls for the
                    // end (it may never, if the client hangs up right after the last byte).
                    if self.end == Some(self.pos)
                        && let Some(w) = self.writer.take()
                    {
                        w.finish().await;
                    }
                    return Some(Ok(c));
                }
                Read::Spliced(n) => {
                    self.body = Some(body);
                    self.state.metrics.nar_spliced_bytes.add(n as u64);
                    return Some(Ok(crate::splice::placeholder(n)));
                }
                Read::Done => {
                    if let Some(w) = self.writer.take() {
                        w.finish().await;
                    }
                    return None;
                }
                Read::Failed(why) => {
                    let up = &self.state.upstreams[self.order[self.current]];
                    tracing::warn!(upstream = %up.settings.display, key = %self.key, offset = self.pos, %why, "NAR stream failed; resuming");
                    up.record_failure(None);
                    if self.pos == self.opened_at {
                        // No progress on this body: do not ask this upstream again.
                        self.excluded[self.current] = true;
                    }
                    match self.reopen().await {
                        Some(b) => {
                            self.state.metrics.nar_resumes.inc();
                            self.opened_at = self.pos;
                            self.body = Some(b);
                        }
                        None => {
                            self.state.metrics.nar_aborts.inc();
                            tracing::error!(key = %self.key, offset = self.pos, "NAR stream aborted: no upstream can resume it");
                            return Some(Err(io::Error::other(why)));
                        }
                    }
                }
            }
        }
    }

    /// Reads the next non-empty chunk of `body` within the idle time-out.
    async fn read(&mut self, body: &mut NarBody) -> Read {
        let idle = self.state.settings.nar_idle_timeout;
        loop {
            if self.end == Some(self.pos) {
                return Read::Done;
            }
            // A socket body that closed before its `Content-Length`.
            let cut_short = |pos: u64, left: u64| {
                Read::Failed(format!(
                    "upstream ended at {pos} with {left} bytes still to come"
                ))
            };
            let ended = |pos: u64, end: Option<u64>| match end {
                Some(e) if pos < e => Read::Failed(format!("upstream ended at {pos} of {e} bytes")),
                _ => Read::Done,
            };
            let mut chunk = match &mut body.stream {
                NarStream::Chunks(stream) => {
                    match tokio::time::timeout(idle, stream.next()).await {
                        Err(_) => return Read::Failed(format!("no data for {idle:?}")),
                        Ok(None) => return ended(self.pos, self.end),
                        Ok(Some(Err(e))) => return Read::Failed(e.to_string()),
                        Ok(Some(Ok(b))) => b,
                    }
                }
                NarStream::Socket(raw) if !raw.prefix.is_empty() => std::mem::take(&mut raw.prefix),
                NarStream::Socket(raw) if raw.left == 0 => return ended(self.pos, self.end),
                NarStream::Socket(raw) => {
                    if body.skip == 0
                        && let Some(conn) = self.splice.as_ref().filter(|c| c.available())
                    {
                        let room = self.end.map_or(u64::MAX, |e| e - self.pos);
                        let max = raw.left.min(room).min(crate::splice::MAX_FRAME as u64) as usize;
                        // The client takes the previous bytes first (no time-out: a slow
                        // client is not the upstream's failure), then the upstream has
                        // `idle` to send more.
                        conn.drained().await;
                        return match tokio::time::timeout(idle, conn.fill(&raw.sock, max)).await {
                            Err(_) => Read::Failed(format!("no data for {idle:?}")),
                            Ok(Ok(0)) => cut_short(self.pos, raw.left),
                            Ok(Ok(n)) => {
                                raw.left -= n as u64;
                                self.advance(n as u64);
                                Read::Spliced(n)
                            }
                            Ok(Err(e)) => Read::Failed(e.to_string()),
                        };
                    }
                    let want = raw.left.min(SOCKET_CHUNK as u64) as usize;
                    let mut buf = bytes::BytesMut::zeroed(want);
                    match tokio::time::timeout(idle, raw.sock.read(&mut buf)).await {
                        Err(_) => return Read::Failed(format!("no data for {idle:?}")),
                        Ok(Ok(0)) => return cut_short(self.pos, raw.left),
                        Ok(Ok(n)) => {
                            raw.left -= n as u64;
                            buf.truncate(n);
                            buf.freeze()
                        }
                        Ok(Err(e)) => return Read::Failed(e.to_string()),
                    }
                }
            };
            if body.skip > 0 {
                let drop = body.skip.min(chunk.len() as u64);
                body.skip -= drop;
                chunk = chunk.slice(drop as usize..);
            }
            if let Some(e) = self.end {
                let room = e - self.pos;
                if chunk.len() as u64 > room {
                    if self.end != self.total {
                        // A sub-range of the file: stop at its end.
                        chunk = chunk.slice(..room as usize);
                    } else {
                        return Read::Failed("upstream sent more bytes than its length".into());
                    }
                }
            }
            if chunk.is_empty() {
                continue;
            }
            self.advance(chunk.len() as u64);
            return Read::Chunk(chunk);
        }
    }

    /// Counts `n` bytes sent on.
    fn advance(&mut self, n: u64) {
        self.pos += n;
        self.state.metrics.nar_bytes.add(n);
        self.state.upstreams[self.order[self.current]]
            .metrics
            .nar_bytes
            .add(n);
    }

    /// Opens the file at `pos` from the current upstream, then the others.
    async fn reopen(&mut self) -> Option<NarBody> {
        let n = self.order.len();
        for step in 0..n {
            let c = (self.current + step) % n;
            if self.excluded[c] {
                continue;
            }
            let up = &self.state.upstreams[self.order[c]];
            if up.admit().is_err() {
                continue;
            }
            match up.open_nar(&self.key, self.pos).await {
                OpenNar::Opened(b) if b.total == self.total || self.total.is_none() => {
                    self.current = c;
                    return Some(b);
                }
                OpenNar::Opened(b) => {
                    tracing::warn!(upstream = %up.settings.display, key = %self.key, theirs = ?b.total, ours = ?self.total, "same NAR key, different length");
                    self.excluded[c] = true;
                }
                OpenNar::Missing => self.excluded[c] = true,
                OpenNar::Failed(error) => {
                    tracing::warn!(upstream = %up.settings.display, key = %self.key, %error, "NAR resume failed");
                    up.record_failure(None);
                    self.excluded[c] = true;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=100-"), Some((100, None)));
        assert_eq!(parse_range("bytes=0-99"), Some((0, Some(99))));
        assert_eq!(parse_range("bytes=-100"), None);
        assert_eq!(parse_range("bytes=0-1,5-6"), None);
        assert_eq!(parse_range("bytes=9-1"), None);
        assert_eq!(parse_range("items=0-1"), None);
    }
}
