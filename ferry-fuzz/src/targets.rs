//! The fuzz targets: one function per parser or protocol reader, each `fn(&[u8]) -> bool`
//! (true when the input was accepted, which the stable runner uses to keep it for further
//! mutation; cargo-fuzz ignores it). A target panics on any broken invariant: besides "no
//! panic", most check that what they parsed renders and parses back the same.
//!
//! One module per crate whose parsers it fuzzes (`nar` and `nix` for `ferry-nix`); each
//! target is re-exported here and registered in `TARGETS` in `lib.rs` (with `target!`).

use ferry_nix::nixconf::FileLoader;
use ferry_nix::store_path::StoreDir;
use std::borrow::Cow;
use std::io;
use std::path::Path;

fn store() -> StoreDir {
    StoreDir::new("/nix/store").expect("store dir")
}

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Files for `include` and `@file` targets: the input is the main text, then files each
/// after a `\n=== <absolute path>\n` header. Nothing else exists.
pub struct VirtualFs {
    pub main: String,
    pub files: Vec<(String, String)>,
}

pub const FILE_HEADER: &str = "\n=== ";

impl VirtualFs {
    pub fn parse(input: &str) -> VirtualFs {
        let mut parts = input.split(FILE_HEADER);
        let main = parts.next().unwrap_or_default().to_owned();
        let files = parts
            .map(|p| {
                let (name, body) = p.split_once('\n').unwrap_or((p, ""));
                (name.to_owned(), body.to_owned())
            })
            .collect();
        VirtualFs { main, files }
    }

    pub fn render(main: &str, files: &[(String, String)]) -> String {
        let mut s = main.to_owned();
        for (name, body) in files {
            s.push_str(FILE_HEADER);
            s.push_str(name);
            s.push('\n');
            s.push_str(body);
        }
        s
    }
}

impl FileLoader for VirtualFs {
    fn load(&self, path: &Path) -> io::Result<Option<String>> {
        let p = path.to_string_lossy();
        if p.ends_with("unreadable") {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        }
        Ok(self
            .files
            .iter()
            .find(|(n, _)| *n == p)
            .map(|(_, b)| b.clone()))
    }
}

fn runtime<T>(f: impl std::future::Future<Output = T>) -> T {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

const KEY1_PUB: &str = include_str!("../../ferry-nix/tests/golden/narinfo/ferry-test-1.pub");
const KEY2_PUB: &str = include_str!("../../ferry-nix/tests/golden/narinfo/ferry-test-2.pub");

fn trusted_keys() -> ferry_nix::signing::TrustedKeys {
    let list = format!("{} {}", KEY1_PUB.trim(), KEY2_PUB.trim());
    ferry_nix::signing::TrustedKeys::parse_list(&list).expect("golden keys")
}

mod hook;
mod nar;
mod nix;
mod post_build;
mod substituter;

pub use hook::{hook_args_replies, hook_protocol};
pub use nar::{nar_check, nar_parse, nar_restore};
pub use nix::{
    derivation, hash, machines, narinfo, nixconf, serve_client, signing, store_path, wire,
};
pub use post_build::{spool, target_url};
pub use substituter::{retry_after, substituter_check, substituter_paths};
