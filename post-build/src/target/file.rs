//! `file://` targets: atomic, durable writes (stage, fsync, rename, fsync the directory).

use super::{FILE_TMP_DIR, ParsedUrl, TargetUrl, parse_url};
use crate::spool::fsync_dir;
use std::path::Path;

/// [`file_put`] of the file `src`: hard-linked into the staging directory when it is on the
/// same file system (no second copy of a NAR that may be gigabytes: the work file already
/// holds exactly these bytes and is never written again), copied otherwise.
pub(super) fn file_put_from(dir: &Path, key: &str, src: &Path) -> std::io::Result<()> {
    let mut linked = false;
    let r = file_put_with(dir, key, |tmp| {
        if std::fs::hard_link(src, tmp).is_ok() {
            linked = true;
            return std::fs::OpenOptions::new().write(true).open(tmp);
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)?;
        std::io::copy(&mut std::fs::File::open(src)?, &mut f)?;
        Ok(f)
    });
    tracing::debug!(key, linked, "file target written");
    r
}

/// Atomic, durable write of `dir/key`: stage in `dir/.ferry-tmp/`, fsync, rename, fsync the
/// destination directory.
pub(super) fn file_put(
    dir: &Path,
    key: &str,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    file_put_with(dir, key, |tmp| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)?;
        fill(&mut f)?;
        Ok(f)
    })
}

/// The staging, fsync and rename of [`file_put`]; `make` creates the staged file at the path
/// it is given and returns it open for writing.
fn file_put_with(
    dir: &Path,
    key: &str,
    make: impl FnOnce(&Path) -> std::io::Result<std::fs::File>,
) -> std::io::Result<()> {
    let dest = dir.join(key);
    let dest_dir = dest.parent().unwrap_or(dir).to_owned();
    let tmp_dir = dir.join(FILE_TMP_DIR);
    std::fs::create_dir_all(&tmp_dir)?;
    if !dest_dir.exists() {
        std::fs::create_dir_all(&dest_dir)?;
        fsync_dir(dir)?;
    }
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let tmp = tmp_dir.join(format!(
        "{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(r)
    ));
    let result = (|| {
        let f = make(&tmp)?;
        f.sync_all()?;
        // Caches are read by others (nginx, nix-serve): world-readable like Nix's files.
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        drop(f);
        std::fs::rename(&tmp, &dest)?;
        fsync_dir(&dest_dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes staging files a killed uploader left in a `file://` target.
pub(crate) fn clean_file_target(url: &str) {
    if let Ok(ParsedUrl {
        location: TargetUrl::File(dir),
        ..
    }) = parse_url(url)
        && let Ok(rd) = std::fs::read_dir(dir.join(FILE_TMP_DIR))
    {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
