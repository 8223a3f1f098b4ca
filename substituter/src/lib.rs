//! `ferry-substituter`: a local HTTP binary cache for Nix that fans out to upstream caches.
//!
//! Nix sees one fast, always-available substituter that answers only 200 or 404; behind it
//! Ferry asks upstreams in priority order with a head-start race ([`race`]), validates and
//! passes narinfos through byte for byte ([`check`]), remembers definitive misses, guards each
//! upstream with a circuit breaker ([`breaker`]), a rate limit and an in-flight cap, and streams
//! NARs with resume on upstream failure ([`nar`]). See `docs/binary-cache.md`;
//! goal ids (G2, G5, …) are in `docs/goals.md`.
//!
//! Pure core: [`breaker`], [`race`], [`paths`], [`check`], [`config`], [`lru`],
//! [`retry_after`], [`s3`]. Async shell:
//! [`upstream`], [`lookup`], [`nar`], [`disk`], [`server`].

// Only main.rs, the tests and ferry-fuzz use this library: its documentation is about the
// crate-private modules (`cargo doc --document-private-items`), which it links to.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod breaker;
pub(crate) mod ca;
pub mod check;
pub mod config;
pub(crate) mod credentials;
pub mod disk;
pub mod local;
pub(crate) mod lookup;
pub(crate) mod lru;
pub(crate) mod metrics;
pub(crate) mod nar;
pub mod paths;
pub(crate) mod race;
pub mod retry_after;
pub(crate) mod s3;
pub(crate) mod server;
pub(crate) mod splice;
pub mod upstream;

pub use config::Settings;
pub(crate) use server::State;

/// Installs rustls' ring provider for HTTPS upstreams (reqwest is built without a default
/// one); later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves on `listener` until `shutdown` completes, on the caller's runtime (the in-process
/// tests' entry point; the binary uses [`run_workers`]).
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = State::new(settings)?;
    log_upstreams(&state);
    serve(state, listener, shutdown).await
}

fn log_upstreams(state: &State) {
    if let Some(l) = &state.local {
        tracing::info!(store = %l.store_dir(), keys = state.settings.local.as_ref().map_or(0, |s| s.keys.len()), "serving this host's store first");
    }
    for u in &state.upstreams {
        tracing::info!(upstream = %u.settings.display, priority = u.settings.priority, "upstream");
    }
}

/// Serves `state` on `listener` until `shutdown` completes, then finishes the requests in
/// progress.
pub(crate) async fn serve(
    state: std::sync::Arc<State>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The handler as the service itself: no routing table to consult for every request.
    let service = axum::handler::Handler::with_state(server::handle, state);
    // Each connection carries its pipe for spliced NAR bodies (`splice`).
    let listener = splice::SpliceListener(listener);
    axum::serve(
        listener,
        service.into_make_service_with_connect_info::<splice::SpliceHandle>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

/// Binds `workers` listening sockets on `addr` with `SO_REUSEPORT` (the kernel spreads new
/// connections over them), all on the port of the first (so port 0 works). Blocking sockets
/// are returned in non-blocking mode, ready for `tokio::net::TcpListener::from_std`.
pub fn bind_workers(
    addr: std::net::SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    // `TcpSocket::listen` registers with a reactor: a throw-away runtime provides one, and
    // `into_std` takes the socket out of it again.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let _guard = rt.enter();
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(workers.max(1));
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let l = socket.listen(1024)?.into_std()?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Serves on `listeners` (from [`bind_workers`]) with one single-threaded runtime per
/// listener, each on its own thread, until `shutdown` completes; then every runtime finishes
/// its requests in progress.
///
/// Why not one multi-threaded runtime: like nginx's workers, a connection stays on the core
/// that accepted it, with no work stealing, cross-thread wake-ups or shared run queue on the
/// per-request path (G2: warm narinfos on 25 keep-alive connections). The state (answer
/// caches, routes, breakers, metrics, disk cache, HTTP clients) is one `Arc` shared by all
/// runtimes; tasks a request spawns (upstream races, breaker probes, disk writes) run on the
/// runtime that spawned them.
pub fn run_workers(
    settings: Settings,
    listeners: Vec<std::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = State::new(settings)?;
    log_upstreams(&state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let state = std::sync::Arc::clone(&state);
        let mut stop = stop_rx.clone();
        let t = std::thread::Builder::new()
            .name(format!("ferry-worker-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let stopped = async move {
                        // An error means the sender is gone: stop as well.
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    serve(state, listener, stopped).await
                })
            })?;
        threads.push(t);
    }
    // The signal handler and nothing else on the calling thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(shutdown);
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("a worker thread panicked")),
        }
    }
    result
}
