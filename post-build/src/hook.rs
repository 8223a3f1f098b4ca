//! Hook mode: what Nix runs as `post-build-hook` (no arguments; `OUT_PATHS`, `DRV_PATH` in
//! the environment). It must be fast and must never fail a build: a non-zero exit makes the
//! whole Nix invocation fail after the outputs are already valid (docs/upload.md §1.3), so
//! every problem is reported on stderr (shown as `post-build-hook: …`) and the exit is 0.

use crate::config::Settings;
use crate::spool::{Spool, SpoolRecord};

/// What the hook did, for logging and tests.
#[derive(Debug, Default)]
pub struct HookReport {
    pub record: SpoolRecord,
    pub spool_name: Option<String>,
    pub problems: Vec<String>,
}

/// Outputs named by `OUT_PATHS`, or when it is empty (Nix 2.8.0, NixOS/nix#6446) read from
/// the derivation file. `None` when neither works: the uploader resolves the derivation.
pub fn outputs(
    out_paths: &str,
    drv_path: Option<&str>,
    store_dir: &ferry_nix::store_path::StoreDir,
    problems: &mut Vec<String>,
) -> Vec<String> {
    let outs: Vec<String> = out_paths.split_whitespace().map(str::to_owned).collect();
    if !outs.is_empty() {
        return outs;
    }
    let Some(drv) = drv_path else {
        return outs;
    };
    match std::fs::read(drv) {
        Ok(text) => match crate::drv::outputs(&text, store_dir) {
            Ok(o) => o.into_iter().map(|(_, p)| p).collect(),
            Err(e) => {
                problems.push(format!("{drv}: {e}; the uploader will resolve its outputs"));
                Vec::new()
            }
        },
        Err(e) => {
            problems.push(format!(
                "reading {drv}: {e}; the uploader will resolve its outputs"
            ));
            Vec::new()
        }
    }
}

pub fn run(settings: &Settings, out_paths: &str, drv_path: Option<&str>) -> HookReport {
    let mut report = HookReport::default();
    let outs = outputs(
        out_paths,
        drv_path,
        &settings.store_dir,
        &mut report.problems,
    );
    report.record = SpoolRecord {
        drv: drv_path.filter(|d| !d.is_empty()).map(str::to_owned),
        outs,
    };
    enqueue(settings, &mut report);
    report
}

/// Roots the outputs, then spools the record. The root comes first: once the record is
/// durable the path must already be safe from the collector.
pub fn enqueue(settings: &Settings, report: &mut HookReport) {
    if report.record.drv.is_none() && report.record.outs.is_empty() {
        report
            .problems
            .push("neither OUT_PATHS nor DRV_PATH is set: nothing to upload".into());
        return;
    }
    if settings.config.gc_roots {
        let roots = settings.gc_roots_dir();
        for o in &report.record.outs {
            if let Err(e) = crate::gcroot::add(&roots, o) {
                report
                    .problems
                    .push(format!("GC root for {o} in {}: {e}", roots.display()));
            }
        }
    }
    let spool = Spool::new(settings.spool_dir());
    match spool.write(&report.record) {
        Ok(name) => report.spool_name = Some(name),
        Err(e) => report.problems.push(format!(
            "{e}: {:?} NOT queued for upload",
            report.record.outs
        )),
    }
}
