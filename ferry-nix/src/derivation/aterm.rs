//! The `.drv` ATerm text: the parser (`parseDerivation` in Nix 2.8
//! `src/libstore/derivations.cc`) and the renderer (`Derivation::unparse`), kept together
//! because the renderer's quoting decides what the parser accepts in each field. The rules
//! are in the documentation of [`super`].

use super::{Derivation, DerivationError, DerivationOutput, OutputKind};
use crate::store_path::{StoreDir, StorePath};
use std::collections::{BTreeMap, BTreeSet};

/// Parses the text of a `.drv` file (already checked for size and UTF-8).
pub(super) fn parse(text: &str, store_dir: &StoreDir) -> Result<Derivation, DerivationError> {
    Parser {
        s: text,
        pos: 0,
        store_dir,
    }
    .derivation()
}

/// The `.drv` text exactly as Nix writes it (`Derivation::unparse`).
pub(super) fn render(derivation: &Derivation, store_dir: &StoreDir) -> String {
    let mut s = String::with_capacity(4096);
    s.push_str("Derive([");
    for (i, (name, out)) in derivation.outputs.iter().enumerate() {
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
    for (i, (drv, outs)) in derivation.input_drvs.iter().enumerate() {
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
    let srcs: Vec<String> = derivation
        .input_srcs
        .iter()
        .map(|p| store_dir.display(p))
        .collect();
    plain_list(&mut s, srcs.iter().map(String::as_str));
    s.push(',');
    plain(&mut s, &derivation.platform);
    s.push(',');
    escaped(&mut s, &derivation.builder);
    s.push_str(",[");
    for (i, a) in derivation.args.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        escaped(&mut s, a);
    }
    s.push_str("],[");
    for (i, (k, v)) in derivation.env.iter().enumerate() {
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
