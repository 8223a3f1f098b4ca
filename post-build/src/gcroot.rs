//! GC roots for queued paths: a symlink `<nix state dir>/gcroots/ferry/<base name>` → the
//! store path. Nix's collector follows every symlink under `gcroots/` (`findRoots` in
//! `src/libstore/gc.cc`), so a queued path and its closure survive `nix-collect-garbage`
//! until the uploader has pushed it and removes the link (docs/upload.md §5.2 goal 5).

use std::path::{Path, PathBuf};

pub(crate) fn root_path(gcroots: &Path, store_path: &str) -> Option<PathBuf> {
    let base = store_path
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty() && *b != "." && *b != "..")?;
    Some(gcroots.join(base))
}

/// Creates the root; an existing one (the same path queued twice) is fine.
pub(crate) fn add(gcroots: &Path, store_path: &str) -> std::io::Result<()> {
    let Some(link) = root_path(gcroots, store_path) else {
        return Err(std::io::Error::other(format!(
            "not a store path: {store_path:?}"
        )));
    };
    let mk = || std::os::unix::fs::symlink(store_path, &link);
    match mk() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(gcroots)?;
            match mk() {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn remove(gcroots: &Path, store_path: &str) -> std::io::Result<()> {
    let Some(link) = root_path(gcroots, store_path) else {
        return Ok(());
    };
    match std::fs::remove_file(link) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Roots older than `min_age` whose path `is_queued` says no longer waits: left behind by an
/// uploader killed between deleting a job and removing its root.
pub(crate) fn stale(
    gcroots: &Path,
    min_age: std::time::Duration,
    is_queued: &dyn Fn(&str) -> bool,
) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(gcroots) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            let old = e
                .path()
                .symlink_metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a >= min_age);
            let target = std::fs::read_link(e.path()).ok();
            old && target.is_some_and(|t| !is_queued(&t.to_string_lossy()))
        })
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_twice_remove_twice() {
        let d = tempfile::tempdir().expect("dir");
        let roots = d.path().join("gcroots/ferry");
        add(&roots, "/nix/store/abc-x").expect("add");
        add(&roots, "/nix/store/abc-x").expect("add again");
        assert_eq!(
            std::fs::read_link(roots.join("abc-x")).expect("link"),
            PathBuf::from("/nix/store/abc-x")
        );
        let st = stale(&roots, std::time::Duration::ZERO, &|_| false);
        assert_eq!(st.len(), 1);
        assert!(
            stale(&roots, std::time::Duration::ZERO, &|p| p
                == "/nix/store/abc-x")
            .is_empty()
        );
        remove(&roots, "/nix/store/abc-x").expect("remove");
        remove(&roots, "/nix/store/abc-x").expect("remove again");
        assert!(root_path(&roots, "/nix/store/").is_none());
    }
}
