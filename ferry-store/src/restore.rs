//! Importing outputs by `nix-store --restore` and `--register-validity`, on every Nix version.

use crate::tool::{Tool, feed, output, remove_tree};
use crate::{LocalError, LocalStore};
use ferry_nix::export::register_validity_input;
use ferry_nix::hash::Hash;
use ferry_nix::serve::PathInfo;
use ferry_nix::store_path::StorePath;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::process::Command;

/// Makes objects valid without taking the output locks, on every Nix version
/// (docs/hook-protocol.md §3.4): `nix-store --restore` of the NAR under a temporary name in the
/// store directory, `rename` into place (same directory: atomic), `nix-store
/// --register-validity` for all of them in one transaction (Nix hashes the files itself and
/// canonicalises them: mode 444/555, mtime 1, owner root), then `nix-store -q --hash` must
/// equal the builder's `narHash`. No signatures, `ca` or `ultimate` are recorded, unlike
/// `--import` (the daemon does not need them for a built output).
///
/// Garbage collection: a path is garbage while it is invalid and unrooted. The final name is
/// rooted for the whole hook run: the daemon's `DerivationGoal::haveDerivation` calls
/// `addTempRoot` on every known output path before it asks the hook (2.8
/// `derivation-goal.cc`, unchanged at HEAD), and a concurrent GC reads those temp roots. The
/// temporary name is not rooted, so a GC running right then may delete it while it is
/// being restored (`LocalStore::collectGarbage` deletes any entry of the store directory
/// that is not a valid or rooted path); then the restore or the rename fails, or the tree is
/// incomplete — which is why the NAR hash of the final path is checked before it is
/// registered. Nothing is ever registered that does not hash to the builder's `narHash`.
#[derive(Debug, Clone)]
pub struct RestoreImporter {
    pub local: LocalStore,
}

impl RestoreImporter {
    fn tool(&self) -> Command {
        let mut c = Command::new(&self.local.nix_store);
        c.env("NIX_REMOTE", self.local.direct_uri())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    pub(crate) fn failed(&self, path: &StorePath, problem: impl std::fmt::Display) -> LocalError {
        LocalError::Import {
            path: self.local.display(path),
            problem: problem.to_string(),
        }
    }

    /// The subset of `paths` that is not valid (`nix-store --check-validity --print-invalid`).
    pub(crate) async fn invalid(
        &self,
        paths: &[&StorePath],
    ) -> Result<BTreeSet<StorePath>, LocalError> {
        let mut c = self.tool();
        c.args(["--check-validity", "--print-invalid"])
            .args(paths.iter().map(|p| self.local.display(p)));
        let out = output(c, &self.local.nix_store, "nix-store --check-validity").await?;
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                self.local
                    .store_dir
                    .parse(l.trim())
                    .map_err(LocalError::from)
            })
            .collect()
    }

    /// The temporary name `path` is restored under: short (a store path's name may be 211
    /// bytes and NAME_MAX is 255) and unique per hook process.
    fn temporary(&self, path: &StorePath) -> Result<PathBuf, LocalError> {
        let real = self.local.real_path(path);
        let Some(dir) = real.parent() else {
            return Err(self.failed(path, "the store path has no parent directory"));
        };
        Ok(dir.join(format!(
            ".ferry-import-{}-{}",
            path.hash_part(),
            std::process::id()
        )))
    }

    /// Starts `nix-store --restore` of `path`'s NAR under its temporary name; a leftover of a
    /// crashed run with the same pid is removed first.
    pub(crate) fn start(&self, path: &StorePath) -> Result<(Tool, PathBuf), LocalError> {
        let tmp = self.temporary(path)?;
        remove_tree(&tmp)
            .map_err(|e| self.failed(path, format!("removing {}: {e}", tmp.display())))?;
        let mut cmd = self.tool();
        cmd.arg("--restore").arg(&tmp);
        let what = format!("nix-store --restore {}", tmp.display());
        Ok((Tool::spawn(cmd, &self.local.nix_store, what)?, tmp))
    }

    /// After the restore of `path` ended: renames the tree into place and checks its NAR
    /// hash against `sha256`, the hash of the bytes that were checked against the builder's
    /// declaration on the way in. Pushes the final path to `placed` once something is there.
    pub(crate) async fn place(
        &self,
        path: &StorePath,
        tmp: &std::path::Path,
        sha256: &Hash,
        placed: &mut Vec<PathBuf>,
    ) -> Result<(), LocalError> {
        let real = self.local.real_path(path);
        // Something at the final name is an invalid leftover (the path was checked invalid
        // and the daemon holds its lock): Nix deletes it too before it adds a path (2.8
        // `LocalStore::addToStore`, `deletePath(realPath)`).
        let moved = remove_tree(&real).and_then(|()| std::fs::rename(tmp, &real));
        if let Err(e) = moved {
            let _ = remove_tree(tmp);
            return Err(self.failed(path, format!("moving {} into place: {e}", tmp.display())));
        }
        placed.push(real.clone());
        let at = real.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            ferry_nix::nar::dump_path_hashed(&at, std::io::sink())
        })
        .await
        .map_err(|e| self.failed(path, e))?
        .map_err(|e| self.failed(path, format!("hashing the restored tree: {e}")))?;
        if hashed.0 != *sha256 {
            return Err(self.failed(
                path,
                format!(
                    "the restored tree has NAR hash {}, the builder sent {} (was it \
                     changed while restoring, e.g. by a garbage collection?)",
                    hashed.0.to_nix32_prefixed(),
                    sha256.to_nix32_prefixed()
                ),
            ));
        }
        Ok(())
    }

    /// `nix-store --register-validity` for every placed object, in one transaction.
    pub(crate) async fn register(&self, done: &[(PathInfo, Hash)]) -> Result<(), LocalError> {
        let infos: Vec<&PathInfo> = done.iter().map(|(i, _)| i).collect();
        let input = register_validity_input(&infos, &self.local.store_dir);
        let mut cmd = self.tool();
        cmd.arg("--register-validity");
        feed(
            cmd,
            &self.local.nix_store,
            "nix-store --register-validity",
            input.as_bytes(),
        )
        .await
    }

    /// `nix-store -q --hash` of each path must be the SHA-256 of the NAR that was checked
    /// on the way in (the builder's `narHash` itself when it is SHA-256).
    pub(crate) async fn check_registered(
        &self,
        done: &[(PathInfo, Hash)],
    ) -> Result<(), LocalError> {
        let mut c = self.tool();
        c.args(["-q", "--hash"])
            .args(done.iter().map(|(i, _)| self.local.display(&i.path)));
        let out = output(c, &self.local.nix_store, "nix-store -q --hash").await?;
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != done.len() {
            return Err(LocalError::BadOutput {
                command: "nix-store -q --hash".into(),
                problem: format!("printed {} lines for {} paths", lines.len(), done.len()),
            });
        }
        for ((info, sha256), line) in done.iter().zip(lines) {
            let got = Hash::parse_any_prefixed(line.trim())
                .map_err(|e| self.failed(&info.path, format!("registered hash {line:?}: {e}")))?;
            if got != *sha256 {
                return Err(LocalError::RegisteredHashMismatch {
                    path: self.local.display(&info.path),
                    got: got.to_nix32_prefixed(),
                    want: sha256.to_nix32_prefixed(),
                });
            }
        }
        Ok(())
    }

    /// Removes placed trees the store confirms invalid (after a failed or abandoned batch:
    /// registration is one transaction, so normally none of them is valid).
    pub(crate) async fn clean_up(&self, done: &[(PathInfo, Hash)], placed: &[PathBuf]) {
        let paths: Vec<&StorePath> = done.iter().map(|(i, _)| &i.path).collect();
        if paths.is_empty() {
            return;
        }
        if let Ok(still) = self.invalid(&paths).await {
            for (info, _) in done {
                let real = self.local.real_path(&info.path);
                if still.contains(&info.path) && placed.contains(&real) {
                    let _ = remove_tree(&real);
                }
            }
        }
    }
}
