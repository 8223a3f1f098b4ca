//! `ferry-substituter`: a local HTTP binary cache for Nix that fans out to upstream caches.
//!
//! Nix sees one fast, always-available substituter that answers only 200 or 404; behind it
//! Ferry asks upstreams in priority order with a head-start race ([`race`]), validates and
//! passes narinfos through byte for byte ([`check`]), remembers definitive misses, guards each
//! upstream with a circuit breaker ([`breaker`]), a rate limit and an in-flight cap, and streams
//! NARs with resume on upstream failure ([`nar`]). See `shared/docs/binary-cache.md`.
//!
//! Pure core: [`breaker`], [`race`], [`paths`], [`check`], [`config`], [`lru`],
//! [`retry_after`]. Async shell:
//! [`upstream`], [`lookup`], [`nar`], [`disk`], [`server`].

pub mod breaker;
pub mod check;
pub mod config;
pub mod disk;
pub mod lookup;
pub mod lru;
pub mod metrics;
pub mod nar;
pub mod paths;
pub mod race;
pub mod retry_after;
pub mod server;
pub mod upstream;

pub use config::{Overrides, Settings, SubstituterConfig};
pub use server::{State, router};

/// Installs rustls' ring provider for HTTPS upstreams (reqwest is built without a default
/// one); later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves on `listener` until `shutdown` completes.
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = State::new(settings)?;
    for u in &state.upstreams {
        tracing::info!(upstream = %u.settings.url, priority = u.settings.priority, "upstream");
    }
    // The handler as the service itself: no routing table to consult for every request.
    let service = axum::handler::Handler::with_state(server::handle, state);
    axum::serve(listener, service.into_make_service())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
