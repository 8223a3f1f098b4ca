//! Hook mode: what Nix runs as `post-build-hook` (no arguments; `OUT_PATHS`, `DRV_PATH` in
//! the environment). It must be fast and must never fail a build: a non-zero exit makes the
//! whole Nix invocation fail after the outputs are already valid (docs/upload.md §1.3), so
//! every problem is reported on stderr (shown as `post-build-hook: …`) and the exit is 0.

use crate::config::Settings;
use crate::spool::{Spool, SpoolRecord};

/// What the hook did, for logging and tests.
#[derive(Debug, Default)]
pub(crate) struct HookReport {
    pub(crate) record: SpoolRecord,
    /// `DRV_PATH`, for the log (the record names it only when the outputs came from it).
    pub(crate) drv: Option<String>,
    pub(crate) outputs_from: OutputsFrom,
    pub(crate) spool_name: Option<String>,
    pub(crate) problems: Vec<String>,
}

/// Where the hook found the outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputsFrom {
    /// `OUT_PATHS`, as Nix ≥ 2.14 sets it (measured: set on 2.26 and 2.34).
    OutPaths,
    /// The derivation file, because `OUT_PATHS` was empty (Nix 2.8.0, NixOS/nix#6446).
    Derivation,
    /// Neither: the uploader resolves the derivation later.
    #[default]
    Unknown,
}

impl OutputsFrom {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutputsFrom::OutPaths => "OUT_PATHS",
            OutputsFrom::Derivation => "DRV_PATH",
            OutputsFrom::Unknown => "unknown",
        }
    }
}

/// Outputs named by `OUT_PATHS`, or when it is empty (Nix 2.8.0, NixOS/nix#6446) read from
/// the derivation file. Empty when neither works: the uploader resolves the derivation.
pub fn outputs(
    out_paths: &str,
    drv_path: Option<&str>,
    store_dir: &ferry_nix::store_path::StoreDir,
    problems: &mut Vec<String>,
) -> (Vec<String>, OutputsFrom) {
    let outs: Vec<String> = out_paths.split_whitespace().map(str::to_owned).collect();
    if !outs.is_empty() {
        return (outs, OutputsFrom::OutPaths);
    }
    let Some(drv) = drv_path else {
        return (outs, OutputsFrom::Unknown);
    };
    match std::fs::read(drv) {
        Ok(text) => match crate::drv::outputs(&text, store_dir) {
            Ok(o) => (
                o.into_iter().map(|(_, p)| p).collect(),
                OutputsFrom::Derivation,
            ),
            Err(e) => {
                problems.push(format!("{drv}: {e}; the uploader will resolve its outputs"));
                (Vec::new(), OutputsFrom::Unknown)
            }
        },
        Err(e) => {
            problems.push(format!(
                "reading {drv}: {e}; the uploader will resolve its outputs"
            ));
            (Vec::new(), OutputsFrom::Unknown)
        }
    }
}

/// Spools the outputs. The record names the derivation only when the outputs came from it
/// or are still unknown: with `OUT_PATHS` the uploader has no use for it, and a record
/// without it is how `status`, logs and tests tell which way the hook went.
pub(crate) fn run(settings: &Settings, out_paths: &str, drv_path: Option<&str>) -> HookReport {
    let mut report = HookReport::default();
    let drv = drv_path.filter(|d| !d.is_empty()).map(str::to_owned);
    let (outs, from) = outputs(
        out_paths,
        drv.as_deref(),
        &settings.store_dir,
        &mut report.problems,
    );
    report.record = SpoolRecord {
        drv: if from == OutputsFrom::OutPaths {
            None
        } else {
            drv.clone()
        },
        outs,
    };
    report.drv = drv;
    report.outputs_from = from;
    enqueue(settings, &mut report);
    report
}

/// Roots the outputs, then spools the record. The root comes first: once the record is
/// durable the path must already be safe from the collector.
pub(crate) fn enqueue(settings: &Settings, report: &mut HookReport) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const DRV_TEXT: &str = r#"Derive([("dev","/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev","",""),("out","/nix/store/1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","true"],[])"#;

    fn settings(dir: &std::path::Path) -> Settings {
        Settings::resolve(crate::config::PostBuildConfig {
            state_dir: dir.join("state"),
            gc_roots: false,
            store_dir: Some("/nix/store".into()),
            ..Default::default()
        })
        .expect("settings")
    }

    #[test]
    fn out_paths_win_and_the_record_then_has_no_drv() {
        let d = tempfile::tempdir().expect("dir");
        let drv = d.path().join("x.drv");
        std::fs::write(&drv, DRV_TEXT).expect("drv");
        let drv = drv.to_string_lossy().into_owned();
        let s = settings(d.path());
        let r = run(
            &s,
            " /nix/store/2aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-y \n",
            Some(&drv),
        );
        assert_eq!(r.outputs_from, OutputsFrom::OutPaths);
        assert_eq!(
            r.record,
            SpoolRecord {
                drv: None,
                outs: vec!["/nix/store/2aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-y".into()],
            }
        );
        assert_eq!(r.drv.as_deref(), Some(drv.as_str()));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(r.spool_name.is_some());

        // Nix 2.8: empty OUT_PATHS, outputs read from the derivation, which the record names.
        let r = run(&s, "", Some(&drv));
        assert_eq!(r.outputs_from, OutputsFrom::Derivation);
        assert_eq!(r.record.drv.as_deref(), Some(drv.as_str()));
        assert_eq!(
            r.record.outs,
            [
                "/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev",
                "/nix/store/1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x"
            ]
        );

        // An unreadable derivation: the uploader resolves it.
        let r = run(&s, "", Some("/nonexistent/z.drv"));
        assert_eq!(r.outputs_from, OutputsFrom::Unknown);
        assert_eq!(r.record.drv.as_deref(), Some("/nonexistent/z.drv"));
        assert!(r.record.outs.is_empty());
        assert!(
            r.problems[0].contains("/nonexistent/z.drv"),
            "{:?}",
            r.problems
        );
    }
}
