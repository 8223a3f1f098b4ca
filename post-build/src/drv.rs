//! Just enough of the derivation ATerm format to list a `.drv`'s output paths.
//!
//! Nix 2.8.0 runs the post-build hook with an empty `OUT_PATHS` (NixOS/nix#6446), so the
//! hook reads the outputs from `DRV_PATH` itself. A `.drv` file starts with its outputs
//! (`src/libstore/derivations.cc`, `unparse` / `parseDerivation`):
//!
//! ```text
//! Derive([("out","/nix/store/…-x","",""),("dev","/nix/store/…-x-dev","","")],[…],…)
//! ```
//!
//! Each output is `(name, path, hashAlgo, hash)`; a floating content-addressed output has an
//! empty path and is skipped. Strings escape `"`, `\`, newline, CR and tab with a backslash.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("derivation ATerm at byte {at}: expected {expected}")]
pub struct DrvError {
    pub at: usize,
    pub expected: &'static str,
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn expect(&mut self, lit: &'static str) -> Result<(), DrvError> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(DrvError {
                at: self.i,
                expected: lit,
            })
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn string(&mut self) -> Result<String, DrvError> {
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => {
                    return Err(DrvError {
                        at: self.i,
                        expected: "closing '\"'",
                    });
                }
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = self.s.get(self.i + 1).copied().ok_or(DrvError {
                        at: self.i,
                        expected: "an escaped character",
                    })?;
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    self.i += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| DrvError {
            at: self.i,
            expected: "UTF-8 text",
        })
    }
}

/// `(output name, output path)` of every output with a known path, in file order.
pub fn outputs(text: &[u8]) -> Result<Vec<(String, String)>, DrvError> {
    let mut c = Cursor { s: text, i: 0 };
    c.expect("Derive([")?;
    let mut out = Vec::new();
    if c.peek() == Some(b']') {
        return Ok(out);
    }
    loop {
        c.expect("(")?;
        let name = c.string()?;
        c.expect(",")?;
        let path = c.string()?;
        c.expect(",")?;
        c.string()?;
        c.expect(",")?;
        c.string()?;
        c.expect(")")?;
        if !path.is_empty() {
            out.push((name, path));
        }
        match c.peek() {
            Some(b',') => c.i += 1,
            Some(b']') => break,
            _ => {
                return Err(DrvError {
                    at: c.i,
                    expected: "',' or ']'",
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_outputs() {
        // Shape of a .drv written by Nix 2.8.0 (`nix-instantiate`).
        let drv = br#"Derive([("dev","/nix/store/1k0mzzy0kkv0rb3jcpd4ibbxhqsfkg9a-x-dev","",""),("out","/nix/store/7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo \"hi\\n\" > $out"],[("builder","/bin/sh")])"#;
        let o = outputs(drv).expect("parse");
        assert_eq!(
            o,
            vec![
                ("dev".into(), "/nix/store/1k0mzzy0kkv0rb3jcpd4ibbxhqsfkg9a-x-dev".into()),
                ("out".into(), "/nix/store/7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-x".into()),
            ]
        );
    }

    #[test]
    fn floating_ca_output_skipped_and_escapes() {
        let drv = br#"Derive([("out","","r:sha256",""),("a\"b","/s/p","","")],[])"#;
        assert_eq!(outputs(drv).expect("parse"), vec![("a\"b".into(), "/s/p".into())]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(outputs(b"").is_err());
        assert!(outputs(b"Derive([(\"out\"").is_err());
        assert!(outputs(b"Derive([(\"out\",\"/p\",\"\",\"\")").is_err());
        assert_eq!(outputs(b"Derive([],[])"), Ok(vec![]));
    }
}
