//! Importing outputs whose locks the daemon holds (docs/hook-protocol.md §3.4): the
//! method, the batch the builder's NARs stream through.

use crate::tool::{Tool, remove_tree};
use crate::{LocalError, LocalStore, RestoreImporter};
use ferry_nix::export::{EXPORT_OBJECT_START, export_trailer};
use ferry_nix::hash::Hash;
use ferry_nix::nix_version::held_locks_supported;
use ferry_nix::serve::PathInfo;
use ferry_nix::store_path::StorePath;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;
use tokio::process::Command;

/// How outputs are imported (`import-method` in `[build-hook]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImportMethod {
    Auto,
    HeldLocks,
    Restore,
}

impl ImportMethod {
    pub fn name(self) -> &'static str {
        match self {
            ImportMethod::Auto => "auto",
            ImportMethod::HeldLocks => "held-locks",
            ImportMethod::Restore => "restore",
        }
    }
}

/// `nix-store --import` of an export stream with `NIX_HELD_LOCKS` naming the outputs, so
/// the store skips the locks the daemon holds for them (`LocalStore` constructor, Nix
/// 2.0–2.28 and Lix; removed in Nix 2.29). Requires opening the store directly, so the
/// tool runs with `NIX_REMOTE=local` (or the daemon's own local store URI).
///
/// `nix-store --import` holds each NAR in memory before it adds it (`importPaths` tees the
/// NAR into a `StringSink`,
/// <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/export-import.cc>), so a
/// batch with a NAR over [`HELD_LOCKS_MAX_NAR`] goes through [`RestoreImporter`], which
/// streams on every version: memory stays bounded in the tool too, not only in the hook.
#[derive(Debug, Clone)]
pub struct HeldLocksImporter {
    pub local: LocalStore,
}

/// The largest NAR [`HeldLocksImporter`] hands to `nix-store --import` (which buffers it
/// whole, and grows its buffer by doubling).
pub const HELD_LOCKS_MAX_NAR: u64 = 64 << 20;

impl HeldLocksImporter {
    fn start(&self, infos: &[PathInfo]) -> Result<Tool, LocalError> {
        let held: Vec<String> = infos.iter().map(|i| self.local.display(&i.path)).collect();
        let program = &self.local.nix_store;
        let mut cmd = Command::new(program);
        cmd.arg("--import")
            .env("NIX_REMOTE", self.local.direct_uri())
            .env("NIX_HELD_LOCKS", held.join(" "));
        Tool::spawn(cmd, program, "nix-store --import".into())
    }
}

/// The importer `import-method` asks for; `auto` looks at `nix-store --version` once per
/// [`LocalStore`] (unknown versions get [`RestoreImporter`], which works everywhere).
#[derive(Debug, Clone)]
pub enum AnyImporter {
    HeldLocks(HeldLocksImporter),
    Restore(RestoreImporter),
}

impl AnyImporter {
    pub async fn choose(method: ImportMethod, local: &LocalStore) -> AnyImporter {
        let held = match method {
            ImportMethod::HeldLocks => true,
            ImportMethod::Restore => false,
            ImportMethod::Auto => local
                .nix_version()
                .await
                .is_some_and(|v| held_locks_supported(&v)),
        };
        let local = local.clone();
        if held {
            AnyImporter::HeldLocks(HeldLocksImporter { local })
        } else {
            AnyImporter::Restore(RestoreImporter { local })
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            AnyImporter::HeldLocks(_) => "held-locks",
            AnyImporter::Restore(_) => "restore",
        }
    }
}

impl AnyImporter {
    /// Starts importing `infos` (in dependency order, as fetched from the builder): which
    /// of them still need their NAR, and the tool that takes it.
    pub async fn begin(&self, infos: &[PathInfo]) -> Result<ImportBatch, LocalError> {
        let restore = match self {
            AnyImporter::HeldLocks(h) => {
                if infos.iter().all(|i| i.nar_size <= HELD_LOCKS_MAX_NAR) {
                    return Ok(ImportBatch(BatchKind::HeldLocks {
                        importer: h.clone(),
                        infos: infos.to_vec(),
                        tool: None,
                    }));
                }
                RestoreImporter {
                    local: h.local.clone(),
                }
            }
            AnyImporter::Restore(r) => r.clone(),
        };
        let paths: Vec<&StorePath> = infos.iter().map(|i| &i.path).collect();
        // Outputs already valid (built earlier, or another output of the same derivation
        // registered by an earlier run) are left alone, and not fetched.
        let needed = if paths.is_empty() {
            BTreeSet::new()
        } else {
            restore.invalid(&paths).await?
        };
        Ok(ImportBatch(BatchKind::Restore {
            importer: restore,
            needed,
            current: None,
            done: Vec::new(),
            placed: Vec::new(),
        }))
    }
}

/// An import in progress: the builder's NARs stream through it one at a time, straight
/// into the local tool, so the hook holds one chunk of a NAR at a time whatever the size of
/// the output (issue 12 item 5). Nothing becomes valid before its NAR was checked against
/// the builder's declared size and hash: [`ImportBatch::open`] hands out the tool's
/// input, and only [`ImportBatch::close`] with the checked hash completes an object.
pub struct ImportBatch(BatchKind);

enum BatchKind {
    /// One `nix-store --import` for the batch: per object `1`, the NAR, then the trailer
    /// that makes `importPaths` add it; killed before a trailer if a NAR fails its check.
    HeldLocks {
        importer: HeldLocksImporter,
        infos: Vec<PathInfo>,
        tool: Option<Tool>,
    },
    /// One `nix-store --restore` per object under a temporary name, renamed into place
    /// when its check passed; one `--register-validity` for all at [`ImportBatch::commit`].
    Restore {
        importer: RestoreImporter,
        needed: BTreeSet<StorePath>,
        current: Option<(Tool, PathBuf)>,
        /// Placed objects with the SHA-256 of their checked NAR.
        done: Vec<(PathInfo, Hash)>,
        placed: Vec<PathBuf>,
    },
}

impl ImportBatch {
    /// The method in use (a held-locks batch with a large NAR is a restore batch).
    pub fn name(&self) -> &'static str {
        match &self.0 {
            BatchKind::HeldLocks { .. } => "held-locks",
            BatchKind::Restore { .. } => "restore",
        }
    }

    /// Whether `path`'s NAR is wanted (it is not valid locally yet).
    pub fn needs(&self, path: &StorePath) -> bool {
        match &self.0 {
            BatchKind::HeldLocks { .. } => true,
            BatchKind::Restore { needed, .. } => needed.contains(path),
        }
    }

    /// Starts one object: the writer its NAR goes to.
    pub async fn open(
        &mut self,
        info: &PathInfo,
    ) -> Result<&mut tokio::process::ChildStdin, LocalError> {
        match &mut self.0 {
            BatchKind::HeldLocks {
                importer,
                infos,
                tool,
            } => {
                if tool.is_none() {
                    *tool = Some(importer.start(infos)?);
                }
                let Some(t) = tool.as_mut() else {
                    return Err(importer.local_failed(&info.path, "no import tool"));
                };
                t.write(&EXPORT_OBJECT_START).await?;
                t.stdin()
            }
            BatchKind::Restore {
                importer, current, ..
            } => {
                let _ = discard(current.take()).await;
                let (t, tmp) = importer.start(&info.path)?;
                let (t, _) = current.insert((t, tmp));
                t.stdin()
            }
        }
    }

    /// Completes the object [`open`](Self::open) started, once its NAR passed the check;
    /// `sha256` is the hash of the NAR written.
    pub async fn close(&mut self, info: &PathInfo, sha256: Hash) -> Result<(), LocalError> {
        match &mut self.0 {
            BatchKind::HeldLocks { importer, tool, .. } => {
                let trailer = export_trailer(info, &importer.local.store_dir);
                let Some(t) = tool.as_mut() else {
                    return Err(importer.local_failed(&info.path, "no import tool"));
                };
                t.write(&trailer).await?;
                t.flush().await
            }
            BatchKind::Restore {
                importer,
                current,
                done,
                placed,
                ..
            } => {
                let Some((t, tmp)) = current.take() else {
                    return Err(importer.failed(&info.path, "no restore running"));
                };
                if let Err(e) = t.finish().await {
                    let _ = remove_tree(&tmp);
                    return Err(e);
                }
                importer.place(&info.path, &tmp, &sha256, placed).await?;
                done.push((info.clone(), sha256));
                Ok(())
            }
        }
    }

    /// Makes every closed object valid.
    pub async fn commit(self) -> Result<(), LocalError> {
        match self.0 {
            BatchKind::HeldLocks { tool, .. } => {
                let Some(mut t) = tool else {
                    return Ok(());
                };
                // The end of the export stream.
                if let Err(e) = t.write(&0u64.to_le_bytes()).await {
                    return Err(t.kill().await.unwrap_or(e));
                }
                t.finish().await
            }
            BatchKind::Restore {
                importer,
                current,
                done,
                placed,
                ..
            } => {
                let _ = discard(current).await;
                if done.is_empty() {
                    return Ok(());
                }
                if let Err(e) = importer.register(&done).await {
                    importer.clean_up(&done, &placed).await;
                    return Err(e);
                }
                importer.check_registered(&done).await
            }
        }
    }

    /// Gives the batch up after a failure: nothing of the object in progress is kept, and
    /// placed objects are removed. If the local tool had failed on its own (a write to it
    /// failed because it was gone), its error, which says why.
    pub async fn abort(self) -> Option<LocalError> {
        match self.0 {
            BatchKind::HeldLocks { tool, .. } => match tool {
                Some(t) => t.kill().await,
                None => None,
            },
            BatchKind::Restore {
                importer,
                current,
                done,
                placed,
                ..
            } => {
                let failure = discard(current).await;
                importer.clean_up(&done, &placed).await;
                failure
            }
        }
    }
}

/// Stops the restore in progress, if any, and removes what it wrote: its own failure if it
/// had failed (see [`Tool::kill`]).
async fn discard(current: Option<(Tool, PathBuf)>) -> Option<LocalError> {
    let (tool, tmp) = current?;
    let failure = tool.kill().await;
    let _ = remove_tree(&tmp);
    failure
}

impl HeldLocksImporter {
    fn local_failed(&self, path: &StorePath, problem: &str) -> LocalError {
        LocalError::Import {
            path: self.local.display(path),
            problem: problem.to_owned(),
        }
    }
}
