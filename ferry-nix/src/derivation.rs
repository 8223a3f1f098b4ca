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
        Parser {
            s: text,
            pos: 0,
            store_dir,
        }
        .derivation()
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
        let mut s = String::with_capacity(4096);
        s.push_str("Derive([");
        for (i, (name, out)) in self.outputs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            plain(&mut s, name);
            s.push(',');
            let path = out.path.as_ref().map(|p| store_dir.display(p));
            plain(&mut s, path.as_deref().unwrap_or(""));
            s.push(',');
            plain(&mut s, &out.hash_algo);
            s.push(',');
            plain(&mut s, &out.hash);
            s.push(')');
        }
        s.push_str("],[");
        for (i, (drv, outs)) in self.input_drvs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            plain(&mut s, &store_dir.display(drv));
            s.push(',');
            plain_list(&mut s, outs.iter().map(String::as_str));
            s.push(')');
        }
        s.push_str("],");
        let srcs: Vec<String> = self
            .input_srcs
            .iter()
            .map(|p| store_dir.display(p))
            .collect();
        plain_list(&mut s, srcs.iter().map(String::as_str));
        s.push(',');
        plain(&mut s, &self.platform);
        s.push(',');
        escaped(&mut s, &self.builder);
        s.push_str(",[");
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            escaped(&mut s, a);
        }
        s.push_str("],[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('(');
            escaped(&mut s, k);
            s.push(',');
            escaped(&mut s, v);
            s.push(')');
        }
        s.push_str("])");
        s
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

/// `printUnquotedString`: the field is written as is between quotes.
fn plain(s: &mut String, v: &str) {
    s.push('"');
    s.push_str(v);
    s.push('"');
}

fn plain_list<'a>(s: &mut String, items: impl Iterator<Item = &'a str>) {
    s.push('[');
    for (i, v) in items.enumerate() {
        if i > 0 {
            s.push(',');
        }
        plain(s, v);
    }
    s.push(']');
}

/// `printString`: `"` and `\` get a backslash, newline, CR and tab become `\n` `\r` `\t`.
fn escaped(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c => s.push(c),
        }
    }
    s.push('"');
}

/// How a string field is written by `unparse`, which decides what the parser accepts in it.
#[derive(Clone, Copy)]
enum Quoting {
    /// `printUnquotedString`: no escapes at all.
    Plain(&'static str),
    /// `printString`: escapes for `"`, `\`, newline, CR, tab.
    Escaped(&'static str),
}

/// Hash algorithms a fixed output may name, with their digest size in bytes
/// (`parseHashType` in `src/libutil/hash.cc`; BLAKE3 from Nix 2.27).
const HASH_SIZES: [(&str, usize); 5] = [
    ("md5", 16),
    ("sha1", 20),
    ("sha256", 32),
    ("sha512", 64),
    ("blake3", 32),
];

/// Ingestion-method prefixes of `hashAlgo` (`makeFileIngestionPrefix`, and `text:` /
/// `git:` from `ContentAddressMethod::render` in later Nix).
const METHOD_PREFIXES: [&str; 3] = ["r:", "text:", "git:"];

struct Parser<'a> {
    s: &'a str,
    pos: usize,
    store_dir: &'a StoreDir,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        self.s.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    /// A short view of the input at the current position, for messages.
    fn got(&self) -> String {
        self.rest().chars().take(16).collect()
    }

    fn expected(&self, expected: &'static str) -> DerivationError {
        if self.rest().is_empty() {
            DerivationError::Truncated {
                offset: self.pos,
                expected,
            }
        } else {
            DerivationError::Expected {
                offset: self.pos,
                expected,
                got: self.got(),
            }
        }
    }

    fn expect(&mut self, lit: &'static str, shown: &'static str) -> Result<(), DerivationError> {
        // Compare as much as is there so a truncated literal reports the end of input.
        let rest = self.rest();
        if rest.starts_with(lit) {
            self.pos += lit.len();
            return Ok(());
        }
        if lit.starts_with(rest) {
            return Err(DerivationError::Truncated {
                offset: self.s.len(),
                expected: shown,
            });
        }
        Err(self.expected(shown))
    }

    /// After an item: `,` (more follow, returns false) or `]` (the list ends, returns true).
    fn list_next(&mut self) -> Result<bool, DerivationError> {
        match self.peek() {
            Some(',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(']') => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(self.expected("',' or ']'")),
        }
    }

    /// After `[`: true if the list is empty (and consumes the `]`).
    fn list_empty(&mut self) -> bool {
        if self.peek() == Some(']') {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Parses a comma-separated list body after `[`, up to and including `]`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DerivationError>,
    ) -> Result<Vec<T>, DerivationError> {
        let mut v = Vec::new();
        if self.list_empty() {
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            if self.list_next()? {
                return Ok(v);
            }
        }
    }

    /// A quoted string; returns its start offset and decoded value.
    fn string(&mut self, q: Quoting) -> Result<(usize, String), DerivationError> {
        let start = self.pos;
        self.expect("\"", "'\"' (a string)")?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        loop {
            let Some((i, c)) = chars.next() else {
                return Err(DerivationError::Truncated {
                    offset: self.s.len(),
                    expected: "the closing '\"' of the string",
                });
            };
            let at = self.pos + i;
            match (c, q) {
                ('"', _) => {
                    self.pos = at + 1;
                    return Ok((start, out));
                }
                ('\\', Quoting::Plain(field)) => {
                    return Err(DerivationError::EscapeInPlainField { offset: at, field });
                }
                ('\\', Quoting::Escaped(_)) => {
                    let Some((_, e)) = chars.next() else {
                        return Err(DerivationError::Truncated {
                            offset: self.s.len(),
                            expected: "an escaped character after '\\'",
                        });
                    };
                    out.push(match e {
                        '"' => '"',
                        '\\' => '\\',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        other => {
                            return Err(DerivationError::BadEscape {
                                offset: at,
                                ch: other,
                            });
                        }
                    });
                }
                ('\n' | '\r' | '\t', Quoting::Escaped(field)) => {
                    return Err(DerivationError::RawControl {
                        offset: at,
                        field,
                        ch: c,
                    });
                }
                (c, _) => out.push(c),
            }
        }
    }

    fn store_path(&mut self, field: &'static str) -> Result<(usize, StorePath), DerivationError> {
        let (at, s) = self.string(Quoting::Plain(field))?;
        let p = self
            .store_dir
            .parse(&s)
            .map_err(|source| DerivationError::BadStorePath {
                offset: at,
                field,
                source,
            })?;
        Ok((at, p))
    }

    fn derivation(mut self) -> Result<Derivation, DerivationError> {
        let mut drv = Derivation::default();
        self.expect("Derive([", "\"Derive([\"")?;

        let outputs = self.list(|p| p.output())?;
        drv.outputs = sorted_map(outputs, "output")?;

        self.expect(",[", "',[' before the input derivations")?;
        let inputs = self.list(|p| {
            p.expect("(", "'(' (an input derivation)")?;
            let (at, path) = p.store_path("input derivation path")?;
            p.expect(",[", "',[' before the output names")?;
            let outs = p.list(|p| p.string(Quoting::Plain("input derivation output name")))?;
            let outs = sorted_set(outs, "input derivation output name")?;
            p.expect(")", "')' after an input derivation")?;
            Ok((at, path, outs))
        })?;
        drv.input_drvs = sorted_map_by(inputs, "input derivation", |p| p.to_string())?;

        self.expect(",[", "',[' before the input sources")?;
        let srcs = self.list(|p| p.store_path("input source"))?;
        let srcs: Vec<_> = srcs.into_iter().map(|(at, p)| (at, p, ())).collect();
        drv.input_srcs = sorted_map_by(srcs, "input source", |p| p.to_string())?
            .into_keys()
            .collect();

        self.expect(",", "',' before the platform")?;
        drv.platform = self.string(Quoting::Plain("platform"))?.1;
        self.expect(",", "',' before the builder")?;
        drv.builder = self.string(Quoting::Escaped("builder"))?.1;

        self.expect(",[", "',[' before the builder arguments")?;
        drv.args = self
            .list(|p| p.string(Quoting::Escaped("builder arguments")))?
            .into_iter()
            .map(|(_, a)| a)
            .collect();

        self.expect(",[", "',[' before the environment")?;
        let env = self.list(|p| {
            p.expect("(", "'(' (an environment variable)")?;
            let (at, k) = p.string(Quoting::Escaped("environment"))?;
            p.expect(",", "',' between an environment variable's name and value")?;
            let (_, v) = p.string(Quoting::Escaped("environment"))?;
            p.expect(")", "')' after an environment variable")?;
            Ok((at, k, v))
        })?;
        drv.env = sorted_map_by(env, "environment variable", |k| k.clone())?;

        self.expect(")", "the closing ')' of Derive(...)")?;
        if self.pos < self.s.len() {
            return Err(DerivationError::TrailingData { offset: self.pos });
        }
        Ok(drv)
    }

    fn output(&mut self) -> Result<(usize, String, DerivationOutput), DerivationError> {
        self.expect("(", "'(' (an output)")?;
        let (at, name) = self.string(Quoting::Plain("output name"))?;
        self.expect(",", "',' after the output name")?;
        let (path_at, path) = self.string(Quoting::Plain("output path"))?;
        self.expect(",", "',' after the output path")?;
        let (algo_at, hash_algo) = self.string(Quoting::Plain("output hash algorithm"))?;
        self.expect(",", "',' after the output hash algorithm")?;
        let (hash_at, hash) = self.string(Quoting::Plain("output hash"))?;
        self.expect(")", "')' after an output")?;

        let bad = |offset: usize, problem: String| DerivationError::BadOutput {
            offset,
            name: name.clone(),
            problem,
        };
        if name.is_empty() {
            return Err(bad(at, "the output name is empty".into()));
        }
        let path =
            if path.is_empty() {
                None
            } else {
                Some(self.store_dir.parse(&path).map_err(|source| {
                    DerivationError::BadStorePath {
                        offset: path_at,
                        field: "output path",
                        source,
                    }
                })?)
            };
        let out = DerivationOutput {
            path,
            hash_algo,
            hash,
        };
        if out.hash_algo.is_empty() {
            if !out.hash.is_empty() {
                return Err(bad(
                    hash_at,
                    "a hash without a hash algorithm (Nix would ignore it)".into(),
                ));
            }
            return Ok((at, name, out));
        }
        let algo = METHOD_PREFIXES
            .iter()
            .find_map(|m| out.hash_algo.strip_prefix(m))
            .unwrap_or(&out.hash_algo);
        let Some(&(_, size)) = HASH_SIZES.iter().find(|(n, _)| *n == algo) else {
            return Err(bad(
                algo_at,
                format!("unknown hash algorithm {:?}", out.hash_algo),
            ));
        };
        match out.kind() {
            OutputKind::FixedCa => {
                if out.path.is_none() {
                    return Err(bad(
                        path_at,
                        "a fixed-output hash but no output path".into(),
                    ));
                }
                let hex_ok = out.hash.len() == size * 2
                    && out
                        .hash
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !hex_ok {
                    return Err(bad(
                        hash_at,
                        format!(
                            "the fixed hash {:?} is not {} lower-case base-16 digits",
                            out.hash,
                            size * 2
                        ),
                    ));
                }
            }
            OutputKind::FloatingCa | OutputKind::Impure => {
                if out.path.is_some() {
                    return Err(bad(
                        path_at,
                        "a floating or impure output must not have a path".into(),
                    ));
                }
            }
            OutputKind::InputAddressed | OutputKind::Deferred => {}
        }
        Ok((at, name, out))
    }
}

/// Checks that `items` (offset, key, value) are strictly increasing by key and builds the map.
fn sorted_map<V>(
    items: Vec<(usize, String, V)>,
    field: &'static str,
) -> Result<BTreeMap<String, V>, DerivationError> {
    sorted_map_by(items, field, String::clone)
}

fn sorted_map_by<K: Ord, V>(
    items: Vec<(usize, K, V)>,
    field: &'static str,
    show: impl Fn(&K) -> String,
) -> Result<BTreeMap<K, V>, DerivationError> {
    let mut map = BTreeMap::new();
    for (at, k, v) in items {
        if let Some((last, _)) = map.last_key_value() {
            match k.cmp(last) {
                std::cmp::Ordering::Greater => {}
                std::cmp::Ordering::Equal => {
                    return Err(DerivationError::Duplicate {
                        offset: at,
                        field,
                        key: show(&k),
                    });
                }
                std::cmp::Ordering::Less => {
                    return Err(DerivationError::Unsorted {
                        offset: at,
                        field,
                        key: show(&k),
                        prev: show(last),
                    });
                }
            }
        }
        map.insert(k, v);
    }
    Ok(map)
}

fn sorted_set(
    items: Vec<(usize, String)>,
    field: &'static str,
) -> Result<BTreeSet<String>, DerivationError> {
    let items = items.into_iter().map(|(at, s)| (at, s, ())).collect();
    Ok(sorted_map(items, field)?.into_keys().collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").expect("store dir")
    }

    const OUT: &str = "/nix/store/2cxgbxdxsf3288df7g54ja8anlmn0psb-hello";
    const SRC: &str = "/nix/store/3g0l9r3lx2nay67fwy7xgkj8hf33qhg4-src";

    fn sample() -> String {
        format!(
            r#"Derive([("out","{OUT}","","")],[],["{SRC}"],"x86_64-linux","/bin/sh",["-c","echo \"a\\b\"\n\t\r"],[("out","{OUT}"),("x","y")])"#
        )
    }

    #[test]
    fn round_trip() {
        let text = sample();
        let d = Derivation::parse(text.as_bytes(), &sd()).expect("parse");
        assert_eq!(
            d.args,
            vec!["-c".to_owned(), "echo \"a\\b\"\n\t\r".to_owned()]
        );
        assert_eq!(d.outputs["out"].kind(), OutputKind::InputAddressed);
        assert_eq!(d.render(&sd()), text);
    }

    #[test]
    fn errors_name_offsets() {
        let text = sample();
        // Truncated anywhere: always a Truncated or a clear Expected at the end.
        for cut in 0..text.len() {
            let e = Derivation::parse(&text.as_bytes()[..cut], &sd()).expect_err("truncated");
            assert!(
                matches!(e, DerivationError::Truncated { offset, .. } if offset == cut),
                "cut {cut}: {e}"
            );
        }
    }

    #[test]
    fn wire_encoding() {
        let d = Derivation::parse(sample().as_bytes(), &sd()).expect("parse");
        let b = d.to_basic().to_wire(&sd());
        let mut r = crate::wire::WireReader::new(&b[..]);
        assert_eq!(r.read_u64().expect("n"), 1);
        assert_eq!(r.read_string(100).expect("s"), "out");
        assert_eq!(r.read_string(100).expect("s"), OUT);
        assert_eq!(r.read_string(100).expect("s"), "");
        assert_eq!(r.read_string(100).expect("s"), "");
        assert_eq!(r.read_strings(10, 100).expect("srcs"), vec![SRC.to_owned()]);
        assert_eq!(r.read_string(100).expect("s"), "x86_64-linux");
        assert_eq!(r.read_string(100).expect("s"), "/bin/sh");
        assert_eq!(r.read_strings(10, 100).expect("args").len(), 2);
        assert_eq!(r.read_u64().expect("n"), 2);
    }
}
