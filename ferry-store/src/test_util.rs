//! Store paths for the unit tests.

use ferry_nix::store_path::{StoreDir, StorePath};

pub(crate) fn sd() -> StoreDir {
    StoreDir::new("/nix/store").expect("dir")
}

/// A store path named `name` with a hash part made of `c`.
pub(crate) fn sp(c: char, name: &str) -> StorePath {
    StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).expect("path")
}
