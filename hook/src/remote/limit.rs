//! The hook's timers for serve calls: [`Limit`]s per call, the [`Deadlines`] a connection
//! applies, and the [`Activity`] clock that stream wrappers ([`Tracked`]) and the remote log
//! keep, which [`within`] watches. `ServeClient` owns no timer, so without these a half-open
//! connection would block a read forever (NixOS/nix#16437).

use ferry_nix::serve::{BuildOptions, ServeError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::RemoteError;

/// When a serve call is given up. `ServeClient` has no timers; these are the hook's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limit {
    /// The whole call.
    pub(crate) total: Option<Duration>,
    /// Nothing moved on the connection (either direction, or the remote log) for this long.
    pub(crate) idle: Option<Duration>,
}

/// The limits a connection applies to its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadlines {
    /// Queries (`QueryValidPaths` without substitution, `QueryPathInfos`): the remote
    /// answers from its database, in milliseconds on a live connection.
    pub(crate) query: Duration,
    /// NAR transfers: no byte moved for this long. Not a total, so a large closure over a
    /// slow link is fine as long as it moves.
    pub(crate) idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            query: Duration::from_secs(60),
            idle: Duration::from_secs(120),
        }
    }
}

impl Deadlines {
    /// `BuildDerivation`: the remote enforces `timeout` and `max-silent-time` itself and
    /// then answers, so the hook waits that long plus a margin. With neither set there is
    /// no bound, as with the stock hook: a build may take days, and the remote log is the
    /// only sign of life.
    pub(crate) fn build(&self, o: &BuildOptions) -> Limit {
        let plus = |secs: u64| Some(Duration::from_secs(secs) + self.query);
        Limit {
            total: (o.build_timeout > 0)
                .then(|| plus(o.build_timeout))
                .flatten(),
            idle: (o.max_silent_time > 0)
                .then(|| plus(o.max_silent_time))
                .flatten(),
        }
    }
}

/// When bytes last moved on a connection: shared by the stream wrappers, the log forwarder
/// and the watchdog of [`within`].
#[derive(Debug, Clone)]
pub(crate) struct Activity {
    base: Instant,
    /// Milliseconds after `base`.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// A stream half that records activity whenever bytes move.
pub(crate) struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T, activity: Activity) -> Self {
        Tracked { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs one serve call under `limit`. Giving up drops the call's future mid-message, which
/// leaves the client refusing further calls ([`ServeError::Broken`]): the connection is done.
pub(crate) async fn within<T>(
    activity: &Activity,
    machine: &str,
    op: &'static str,
    limit: Limit,
    call: impl Future<Output = Result<T, ServeError>>,
) -> Result<T, RemoteError> {
    let timeout = |what, after| RemoteError::Timeout {
        machine: machine.to_owned(),
        op,
        what,
        after,
    };
    let started = Instant::now();
    let total_deadline = limit.total.map(|d| started + d);
    tokio::pin!(call);
    // The start of the call counts as activity: the idle clock starts now.
    activity.touch();
    loop {
        let idle_deadline = limit.idle.map(|d| activity.last() + d);
        let next = match (total_deadline, idle_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(next) = next else {
            return Ok(call.await?);
        };
        tokio::select! {
            r = &mut call => return Ok(r?),
            () = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                if let (Some(t), Some(d)) = (total_deadline, limit.total)
                    && now >= t
                {
                    return Err(timeout("no answer within", d));
                }
                if let (Some(d), Some(_)) = (limit.idle, idle_deadline)
                    && now >= activity.last() + d
                {
                    return Err(timeout("nothing moved on the connection for", d));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_limits_follow_the_remote_settings() {
        let d = Deadlines::default();
        assert_eq!(d.build(&BuildOptions::default()), Limit::default());
        let l = d.build(&BuildOptions {
            build_timeout: 10,
            max_silent_time: 5,
            ..BuildOptions::default()
        });
        assert_eq!(l.total, Some(Duration::from_secs(10) + d.query));
        assert_eq!(l.idle, Some(Duration::from_secs(5) + d.query));
    }

    /// A call that never answers is given up at the idle limit, while one whose peer keeps
    /// the connection busy is not; a total limit ends even a busy call.
    #[tokio::test(start_paused = true)]
    async fn limits_give_up_on_silence() {
        let activity = Activity::new();
        let never = std::future::pending::<Result<(), ServeError>>();
        let idle = Limit {
            total: None,
            idle: Some(Duration::from_secs(5)),
        };
        let t = Instant::now();
        let e = within(&activity, "m", "Op", idle, never)
            .await
            .expect_err("silent call");
        assert!(e.to_string().contains("nothing moved"), "{e}");
        assert_eq!(crate::fault::classify(&e, ""), crate::fault::Fault::Builder);
        assert_eq!(t.elapsed(), Duration::from_secs(5));

        // Busy for 12 s (activity every second), then done: the idle limit never fires.
        let a2 = activity.clone();
        let busy = async move {
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                a2.touch();
            }
            Ok::<_, ServeError>(7)
        };
        let v = within(&activity, "m", "Op", idle, busy)
            .await
            .expect("busy call");
        assert_eq!(v, 7);

        let a3 = activity.clone();
        let endless = async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                a3.touch();
            }
            #[allow(unreachable_code)]
            Ok::<(), ServeError>(())
        };
        let total = Limit {
            total: Some(Duration::from_secs(3)),
            idle: Some(Duration::from_secs(5)),
        };
        let e = within(&activity, "m", "Op", total, endless)
            .await
            .expect_err("over total");
        assert!(e.to_string().contains("no answer within 3s"), "{e}");
    }
}
