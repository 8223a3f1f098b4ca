//! Nix's wire format: little-endian u64 integers and byte strings padded to 8 bytes.
//!
//! Used by the worker, serve and build-hook protocols and by NAR and export files.
//! Follows `src/libutil/serialise.cc` (`readNum`, `readString`, `writeString`).
//! Every read of a length-prefixed value takes a bound so hostile input cannot make the
//! reader allocate without limit.

use std::io::{Read, Write};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("I/O error at byte offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected end of input at byte offset {offset} (wanted {wanted} more bytes)")]
    Eof { offset: u64, wanted: u64 },
    #[error("string at byte offset {offset} is {len} bytes long, the limit here is {limit}")]
    TooLong { offset: u64, len: u64, limit: u64 },
    #[error("non-zero padding byte after the string at byte offset {offset}")]
    BadPadding { offset: u64 },
    #[error("value {value} at byte offset {offset} does not fit in {target}")]
    Overflow {
        offset: u64,
        value: u64,
        target: &'static str,
    },
    #[error("expected {expected} at byte offset {offset}, got {got:?}")]
    Unexpected {
        offset: u64,
        expected: String,
        got: String,
    },
    #[error("string at byte offset {offset} is not valid UTF-8")]
    NotUtf8 { offset: u64 },
    #[error("list at byte offset {offset} has {len} items, the limit here is {limit}")]
    TooManyItems { offset: u64, len: u64, limit: u64 },
}

/// Padding needed after `len` bytes to reach a multiple of 8.
pub fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// A synchronous reader that counts the bytes it consumed, so every error names its offset.
pub struct WireReader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> WireReader<R> {
    pub fn new(inner: R) -> Self {
        WireReader { inner, offset: 0 }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads exactly `buf.len()` bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(WireError::Eof {
                        offset: self.offset,
                        wanted: (buf.len() - done) as u64,
                    });
                }
                Ok(n) => {
                    done += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(WireError::Io {
                        offset: self.offset,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn read_u64(&mut self) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads the zero padding after a string of `len` bytes; non-zero padding is an error,
    /// as in `readPadding`.
    pub fn read_padding(&mut self, len: u64) -> Result<(), WireError> {
        let pad = padding(len);
        if pad > 0 {
            let at = self.offset;
            let mut b = [0u8; 8];
            self.read_exact(&mut b[..pad])?;
            if b[..pad].iter().any(|&x| x != 0) {
                return Err(WireError::BadPadding { offset: at });
            }
        }
        Ok(())
    }

    /// Reads a length-prefixed byte string of at most `limit` bytes.
    pub fn read_bytes(&mut self, limit: u64) -> Result<Vec<u8>, WireError> {
        let at = self.offset;
        let len = self.read_u64()?;
        if len > limit {
            return Err(WireError::TooLong {
                offset: at,
                len,
                limit,
            });
        }
        let mut v = vec![0u8; len as usize];
        self.read_exact(&mut v)?;
        self.read_padding(len)?;
        Ok(v)
    }

    /// Reads a UTF-8 string of at most `limit` bytes.
    pub fn read_string(&mut self, limit: u64) -> Result<String, WireError> {
        let at = self.offset;
        let b = self.read_bytes(limit)?;
        String::from_utf8(b).map_err(|_| WireError::NotUtf8 { offset: at })
    }

    /// Reads a string and checks it equals `expected` (NAR tokens, protocol tags).
    pub fn expect_str(&mut self, expected: &str) -> Result<(), WireError> {
        let at = self.offset;
        let got = self.read_bytes(expected.len().max(64) as u64)?;
        if got != expected.as_bytes() {
            return Err(WireError::Unexpected {
                offset: at,
                expected: format!("{expected:?}"),
                got: String::from_utf8_lossy(&got).into_owned(),
            });
        }
        Ok(())
    }
}

/// A synchronous writer of wire values.
pub struct WireWriter<W> {
    inner: W,
}

impl<W: Write> WireWriter<W> {
    pub fn new(inner: W) -> Self {
        WireWriter { inner }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn write_u64(&mut self, v: u64) -> std::io::Result<()> {
        self.inner.write_all(&v.to_le_bytes())
    }

    pub fn write_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.write_u64(b.len() as u64)?;
        self.inner.write_all(b)?;
        self.inner.write_all(&[0u8; 8][..padding(b.len() as u64)])
    }

    pub fn write_str(&mut self, s: &str) -> std::io::Result<()> {
        self.write_bytes(s.as_bytes())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
