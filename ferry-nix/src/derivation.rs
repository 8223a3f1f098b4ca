//! Store derivations: the `.drv` ATerm file and the `BasicDerivation` of the serve protocol.
//!
//! Follows Nix 2.8 `src/libstore/derivations.cc`: `parseDerivation` (the grammar and the
//! string escapes), `Derivation::unparse` (the rendering, which decides which fields are
//! escaped) and `writeDerivation` (the `BasicDerivation` on the wire, docs/hook-protocol.md §4.3).
//!
//! ```text
//! Derive([outputs],[inputDrvs],[inputSrcs],platform,builder,[args],[env])
//! output   = ("name","path","hashAlgo","hash")
//! inputDrv = ("/store/…drv",["out",…])
//! env      = ("key","value")
//! ```
//!
//! The parser is stricter than Nix's, on purpose, so that what it accepts renders back
//! byte-for-byte ([`Derivation::render`]) and means one thing:
//! - Nix's `endOfList` tolerates a missing comma between items (`["a""b"]`); we require one.
//! - Nix's `parseString` reads `\x` as `x` for any `x`; Nix only ever writes `\"`, `\\`,
//!   `\n`, `\r` and `\t`, so any other escape is an error.
//! - `unparse` prints builder, args and env escaped, and everything else (output names and
//!   fields, input paths, platform) as is. A backslash in an as-is field, or a raw newline,
//!   carriage return or tab in an escaped one, cannot come from Nix and is an error.
//! - Nix reads outputs, input derivations, input sources and env into maps and sets, so it
//!   silently sorts them and merges duplicates (first output wins, last env value wins). Nix
//!   always writes them sorted and unique; we reject unsorted or duplicate keys rather than
//!   guess which duplicate was meant.
//! - Trailing bytes after the final `)` are an error (Nix ignores them).
//!
//! Checked against Nix 2.8.0: a `.drv` with an unsorted env or without the comma between two
//! args is accepted by `nix-store --add` and shown by `nix show-derivation` (sorted), so such
//! files can exist in a store, but only when made by hand; evaluation never writes them.
//! - The whole file must be UTF-8 and at most [`MAX_DRV_SIZE`] bytes.
//!
//! Every error names the byte offset where the offending token starts (or where input ran
//! out) and what was expected there.
//!
//! The ATerm parser and renderer are in `derivation/aterm.rs`; this file holds the model, its
//! errors and queries, and the serve-protocol encoding of the basic derivation.

use crate::store_path::{StoreDir, StorePath, StorePathError};
use crate::wire::WireWriter;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use thiserror::Error;

/// Largest `.drv` file accepted. Real derivations are at most a few MiB (large `env` values
/// from `passAsFile`-less builds); the cap bounds what reading one allocates.
pub const MAX_DRV_SIZE: u64 = 64 * 1024 * 1024;

/// Errors while reading a `.drv` file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DerivationError {
    #[error("derivation is {size} bytes long, the limit is {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("reading the derivation failed after {offset} bytes: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("bad derivation at byte offset {offset}: the file is not valid UTF-8")]
    NotUtf8 { offset: usize },
    #[error("bad derivation: truncated at byte offset {offset}, expected {expected}")]
    Truncated {
        offset: usize,
        expected: &'static str,
    },
    #[error("bad derivation at byte offset {offset}: expected {expected}, got {got:?}")]
    Expected {
        offset: usize,
        expected: &'static str,
        got: String,
    },
    #[error(
        "bad derivation at byte offset {offset}: unknown escape '\\{ch}' in a string (Nix writes only \\\" \\\\ \\n \\r \\t)"
    )]
    BadEscape { offset: usize, ch: char },
    #[error(
        "bad derivation at byte offset {offset}: a backslash in the {field}, which Nix writes without escapes"
    )]
    EscapeInPlainField { offset: usize, field: &'static str },
    #[error(
        "bad derivation at byte offset {offset}: raw {ch:?} in the {field}, which Nix writes escaped"
    )]
    RawControl {
        offset: usize,
        field: &'static str,
        ch: char,
    },
    #[error("bad derivation at byte offset {offset}: invalid store path in the {field}: {source}")]
    BadStorePath {
        offset: usize,
        field: &'static str,
        #[source]
        source: StorePathError,
    },
    #[error(
        "bad derivation at byte offset {offset}: {field} {key:?} is not sorted, it follows {prev:?} (Nix writes them in byte order)"
    )]
    Unsorted {
        offset: usize,
        field: &'static str,
        key: String,
        prev: String,
    },
    #[error("bad derivation at byte offset {offset}: {field} {key:?} appears twice")]
    Duplicate {
        offset: usize,
        field: &'static str,
        key: String,
    },
    #[error("bad derivation at byte offset {offset}: output {name:?}: {problem}")]
    BadOutput {
        offset: usize,
        name: String,
        problem: String,
    },
    #[error(
        "bad derivation at byte offset {offset}: trailing data after the closing ')' of Derive(...)"
    )]
    TrailingData { offset: usize },
}

impl DerivationError {
    /// The byte offset the error refers to (the size for [`DerivationError::TooLarge`]).
    pub fn offset(&self) -> u64 {
        match self {
            DerivationError::TooLarge { size, .. } => *size,
            DerivationError::Io { offset, .. } => *offset,
            DerivationError::NotUtf8 { offset }
            | DerivationError::Truncated { offset, .. }
            | DerivationError::Expected { offset, .. }
            | DerivationError::BadEscape { offset, .. }
            | DerivationError::EscapeInPlainField { offset, .. }
            | DerivationError::RawControl { offset, .. }
            | DerivationError::BadStorePath { offset, .. }
            | DerivationError::Unsorted { offset, .. }
            | DerivationError::Duplicate { offset, .. }
            | DerivationError::BadOutput { offset, .. }
            | DerivationError::TrailingData { offset } => *offset as u64,
        }
    }
}

/// One output as the `.drv` file states it: the three strings after the name, kept as
/// strings (the path parsed, since it must be a store path when present). See
/// [`DerivationOutput::kind`] for what the combination means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationOutput {
    /// The output path; `None` when the file has `""` (floating CA, deferred, impure).
    pub path: Option<StorePath>,
    /// `""` for input-addressed outputs, else the method and algorithm: `sha256`,
    /// `r:sha256`, `text:sha256`, `git:sha1` …
    pub hash_algo: String,
    /// The fixed hash in lower-case base-16, `""`, or `impure`.
    pub hash: String,
}

/// What an output's `(path, hashAlgo, hash)` triple means (`parseDerivationOutput`, and the
/// table in docs/hook-protocol.md §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `path, "", ""`.
    InputAddressed,
    /// `path, algo, hex`.
    FixedCa,
    /// `"", algo, ""` (`ca-derivations`).
    FloatingCa,
    /// `"", "", ""`: the path is not known yet.
    Deferred,
    /// `"", algo, "impure"` (`impure-derivations`).
    Impure,
}

impl DerivationOutput {
    pub fn kind(&self) -> OutputKind {
        match (
            self.path.is_some(),
            self.hash_algo.is_empty(),
            self.hash.as_str(),
        ) {
            (true, true, _) => OutputKind::InputAddressed,
            (false, true, _) => OutputKind::Deferred,
            (_, false, "impure") => OutputKind::Impure,
            (_, false, "") => OutputKind::FloatingCa,
            (_, false, _) => OutputKind::FixedCa,
        }
    }
}

/// A parsed `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Output name → output.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivation → the output names used from it.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// A derivation without its input derivations, as the serve protocol's `BuildDerivation`
/// takes it (`BasicDerivation` in `derivations.hh`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl Derivation {
    /// Parses a whole `.drv` file (see the module documentation for the rules).
    pub fn parse(input: &[u8], store_dir: &StoreDir) -> Result<Derivation, DerivationError> {
        if input.len() as u64 > MAX_DRV_SIZE {
            return Err(DerivationError::TooLarge {
                size: input.len() as u64,
                limit: MAX_DRV_SIZE,
            });
        }
        let text = std::str::from_utf8(input).map_err(|e| DerivationError::NotUtf8 {
            offset: e.valid_up_to(),
        })?;
        aterm::parse(text, store_dir)
    }

    /// Reads a `.drv` file whole from `reader` (at most [`MAX_DRV_SIZE`] bytes) and parses it.
    pub fn read_from(
        reader: impl Read,
        store_dir: &StoreDir,
    ) -> Result<Derivation, DerivationError> {
        let mut buf = Vec::new();
        let mut limited = reader.take(MAX_DRV_SIZE + 1);
        limited
            .read_to_end(&mut buf)
            .map_err(|source| DerivationError::Io {
                offset: buf.len() as u64,
                source,
            })?;
        if buf.len() as u64 > MAX_DRV_SIZE {
            return Err(DerivationError::TooLarge {
                size: buf.len() as u64,
                limit: MAX_DRV_SIZE,
            });
        }
        Derivation::parse(&buf, store_dir)
    }

    /// Renders the `.drv` text exactly as Nix writes it (`Derivation::unparse`).
    pub fn render(&self, store_dir: &StoreDir) -> String {
        aterm::render(self, store_dir)
    }

    /// The derivation without its input derivations, `inputSrcs` as in the file. When the
    /// derivation has input derivations, the build hook must send the whole input closure
    /// instead ([`Derivation::to_basic_with_inputs`], docs/hook-protocol.md §3.2).
    pub fn to_basic(&self) -> BasicDerivation {
        self.to_basic_with_inputs(self.input_srcs.clone())
    }

    /// The derivation without its input derivations and with `inputSrcs` replaced by
    /// `input_srcs` (2.8 `build-remote.cc` sends the closure of all inputs this way).
    pub fn to_basic_with_inputs(&self, input_srcs: BTreeSet<StorePath>) -> BasicDerivation {
        BasicDerivation {
            outputs: self.outputs.clone(),
            input_srcs,
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }
}

impl BasicDerivation {
    /// The serve-protocol encoding (`writeDerivation`, docs/hook-protocol.md §4.3): outputs
    /// (count; name, path, hashAlgo, hash each, sorted by name), inputSrcs (sorted string
    /// set), platform, builder, args, env (count; key, value each, sorted by key).
    pub fn to_wire(&self, store_dir: &StoreDir) -> Vec<u8> {
        let mut w = WireWriter::new(Vec::new());
        // Writing into a Vec cannot fail; the results are collected so nothing is lost.
        let result: std::io::Result<()> = (|| {
            w.write_u64(self.outputs.len() as u64)?;
            for (name, out) in &self.outputs {
                w.write_str(name)?;
                let path = out.path.as_ref().map(|p| store_dir.display(p));
                w.write_str(path.as_deref().unwrap_or(""))?;
                w.write_str(&out.hash_algo)?;
                w.write_str(&out.hash)?;
            }
            w.write_strings(self.input_srcs.iter().map(|p| store_dir.display(p)))?;
            w.write_str(&self.platform)?;
            w.write_str(&self.builder)?;
            w.write_strings(&self.args)?;
            w.write_u64(self.env.len() as u64)?;
            for (k, v) in &self.env {
                w.write_str(k)?;
                w.write_str(v)?;
            }
            Ok(())
        })();
        debug_assert!(result.is_ok());
        w.into_inner()
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputKind::InputAddressed => "input-addressed",
            OutputKind::FixedCa => "fixed content-addressed",
            OutputKind::FloatingCa => "floating content-addressed",
            OutputKind::Deferred => "deferred",
            OutputKind::Impure => "impure",
        })
    }
}

mod aterm;
#[cfg(test)]
mod tests;
