//! A file system in memory for the parsers that follow includes (`nix.conf`, `machines`).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// A loader that knows exactly `files` (path, text); any other path is missing.
pub(crate) fn fs(files: &[(&str, &str)]) -> impl Fn(&Path) -> io::Result<Option<String>> {
    let map: HashMap<PathBuf, String> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
        .collect();
    move |p: &Path| Ok(map.get(p).cloned())
}
