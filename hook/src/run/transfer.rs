//! After `# accept`: read the inputs and wanted outputs, copy the missing inputs to the
//! builder, build, fetch the missing outputs and import them (`remote.rs`, the `ferry-store` crate).
//! A failure is classified by [`crate::fault`]: transient ones are retried on the same
//! builder once, then on another; a builder that broke before the build started is
//! replaced by another healthy one (hook/README.md "Failures after the accept").

use super::Ctx;
use super::connect::{self, Failover};
use super::decide::{Builder, Chosen};
use super::error::HookError;
use crate::fault::{self, Fault};
use crate::health;
use crate::protocol::{self, TryRequest, Verbosity};
use crate::remote::{self, Connection, Job, RemoteError};
use crate::slots::{HeldLock, LoadDir};
use ferry_nix::derivation::Derivation;
use ferry_nix::wire::AsyncWireReader;
use ferry_store::{AnyImporter, LocalStore};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::io::AsyncRead;

/// Reads what follows the accept, then copies, builds and imports on the chosen builder,
/// failing over to another healthy builder if it breaks before the build starts. The error
/// is what is left after retries and failover.
pub(super) async fn build<R: AsyncRead + Unpin>(
    chosen: Chosen<'_>,
    t: &TryRequest,
    input: &mut AsyncWireReader<R>,
    ctx: &Ctx<'_>,
) -> Result<(), HookError> {
    let accepted = protocol::read_accepted(input).await?;
    let local = ctx.local.clone();
    let job = Job::new(
        &local.store_dir,
        &t.drv_path,
        &accepted.inputs,
        accepted.wanted_outputs,
        ctx.settings.build_options(),
        ctx.settings.bool("builders-use-substitutes"),
    )?;
    let drv = local.read_derivation(&job.drv_path)?;
    let Chosen {
        mut conn,
        builder: mut on,
        mut slot,
        machines,
        need,
        candidates,
    } = chosen;
    let load_dir = LoadDir::open(&ctx.env.nix_state_dir).ok();
    let work = Work {
        drv_path: &t.drv_path,
        job: &job,
        drv: &drv,
        local: &local,
        load_dir: load_dir.as_ref(),
    };
    let mut failover = Failover {
        load_dir: load_dir.as_ref(),
        machines,
        need: &need,
        candidates: &candidates,
        failed: BTreeSet::new(),
    };
    // Transient failures left to retry (`fault.rs`), and whether the current builder was
    // already given its second chance.
    let mut retries_left = fault::RETRIES;
    let mut retried_here = false;
    let mut importer: Option<AnyImporter> = None;
    loop {
        let Failure {
            error: e,
            remote_stderr,
            build_started,
        } = match attempt(ctx, conn, on, &work, &mut importer, &mut slot).await {
            Ok(()) => return Ok(()),
            Err(f) => f,
        };
        let fault = fault::classify(&e, &remote_stderr);
        match fault {
            Fault::Transient(why) if retries_left > 0 => {
                retries_left -= 1;
                let n = fault::RETRIES - retries_left;
                tokio::time::sleep(fault::backoff(n)).await;
                // Once more on the same builder, then on another one.
                let same = if retried_here {
                    None
                } else {
                    connect::again(ctx, on).await.ok()
                };
                let (c, b, s) = match same {
                    Some(c) => (c, on, slot.take()),
                    None => {
                        drop(slot.take());
                        failover.failed.insert(on.index);
                        let Some(next) = failover.next(ctx).await else {
                            return Err(e.into());
                        };
                        next
                    }
                };
                retried_here = b.index == on.index;
                ctx.logger.log(
                    Verbosity::WARN,
                    format!(
                        "ferry-build-hook: {e} ({}); trying again on '{}' (retry {n} of {})",
                        why.describe(),
                        b.machine.store_uri,
                        fault::RETRIES
                    ),
                );
                (conn, on, slot) = (c, b, s);
            }
            Fault::Builder if !build_started => {
                // The builder broke before the build started: the machine name the daemon
                // printed is cosmetic, so another healthy builder can take over
                // (docs/hook-protocol.md §7.5).
                ctx.prober
                    .record_down(&on.machine.store_uri, &e.to_string());
                drop(slot.take());
                failover.failed.insert(on.index);
                let Some((c, b, s)) = failover.next(ctx).await else {
                    return Err(e.into());
                };
                ctx.logger.log(
                    Verbosity::WARN,
                    format!(
                        "ferry-build-hook: copying to '{}' failed ({e}); building on '{}' instead",
                        on.machine.store_uri, b.machine.store_uri
                    ),
                );
                retried_here = false;
                (conn, on, slot) = (c, b, s);
            }
            _ => {
                if fault == Fault::Builder {
                    ctx.prober
                        .record_down(&on.machine.store_uri, &e.to_string());
                }
                // Shown to the client once ([`HookError::report`]); the remote log already
                // went to fd 4.
                return Err(e.into());
            }
        }
    }
}

/// What every attempt of one build works on.
struct Work<'a> {
    /// The derivation as the daemon named it.
    drv_path: &'a str,
    job: &'a Job,
    drv: &'a Derivation,
    local: &'a LocalStore,
    load_dir: Option<&'a LoadDir>,
}

/// A failed attempt, with what [`fault::classify`] needs.
struct Failure {
    error: RemoteError,
    /// What the builder's side printed (its stderr, the end of the build log).
    remote_stderr: String,
    build_started: bool,
}

/// One attempt on builder `b` over `conn`: copy, build, fetch, import. On success the
/// slot is released and the builder's build time and transfer rate are recorded.
async fn attempt(
    ctx: &Ctx<'_>,
    mut conn: Connection,
    b: Builder<'_>,
    w: &Work<'_>,
    importer: &mut Option<AnyImporter>,
    slot: &mut Option<HeldLock>,
) -> Result<(), Failure> {
    let logger = ctx.logger;
    // Only one upload at a time per builder, shared with stock hooks; given up on after
    // 15 minutes like the stock hook's alarm.
    let upload_lock = w.load_dir.and_then(|d| {
        tokio::task::block_in_place(|| d.upload_lock(b.machine, Duration::from_secs(15 * 60)))
            .ok()
            .flatten()
    });
    let upload = match remote::upload(&mut conn, w.job, w.local, logger, upload_lock).await {
        Ok(upload) => upload,
        Err(error) => {
            // The builder's side often says why only on its stderr.
            let closing = tokio::time::timeout(Duration::from_secs(3), conn.close());
            let remote_stderr = match closing.await {
                Ok(mut tap) => tap.collect(Duration::from_millis(500)).await,
                Err(_) => String::new(),
            };
            return Err(Failure {
                error,
                remote_stderr,
                build_started: false,
            });
        }
    };
    // The remote log goes to fd 4 as it arrives.
    let (forwarder, tail) = conn.forward_log(ctx.env.build_log.clone());
    // After the accept, once per hook process: `auto` runs `nix-store --version`.
    let imp = match importer.take() {
        Some(imp) => imp,
        None => {
            let chosen = AnyImporter::choose(ctx.prober.tuning.import_method, w.local).await;
            logger.log(
                Verbosity::TALKATIVE,
                format!(
                    "ferry-build-hook: importing the outputs of '{}' with import-method {}",
                    w.drv_path,
                    chosen.name()
                ),
            );
            chosen
        }
    };
    let result = remote::build_and_fetch(&mut conn, w.job, w.drv, &imp).await;
    *importer = Some(imp);
    conn.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
    match result {
        Ok((build_secs, fetched)) => {
            drop(slot.take());
            let bytes = upload.bytes + fetched.bytes;
            let secs = upload.secs + fetched.secs;
            let _ = ctx.prober.health.update(&b.machine.store_uri, |h| {
                h.record_build(health::now_ms(), build_secs, Some((bytes, secs)))
            });
            Ok(())
        }
        Err(error) => {
            let tail = tail.lock().map(|t| t.clone()).unwrap_or_default();
            Err(Failure {
                error,
                remote_stderr: String::from_utf8_lossy(&tail).into_owned(),
                build_started: true,
            })
        }
    }
}
