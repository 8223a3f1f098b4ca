//! Nix's wire format: little-endian u64 integers and byte strings padded to 8 bytes.
//!
//! Used by the worker, serve and build-hook protocols and by NAR and export files.
//! Follows `src/libutil/serialise.cc` and `serialise.hh` (`readNum`, `readString`,
//! `readPadding`, `writeString`, `readStrings`). Every read of a length-prefixed value takes a
//! bound so hostile input cannot make the reader allocate without limit, and every error names
//! the byte offset where the bad value starts.
//!
//! There are two front ends with the same methods, bounds, offsets and errors:
//! [`WireReader`]/[`WireWriter`] over `std::io`, and [`AsyncWireReader`]/[`AsyncWireWriter`]
//! over tokio's `AsyncRead`/`AsyncWrite` (feature `tokio`, on by default). Both only move bytes; every check and every error
//! is built by the pure helpers in this file, so the two cannot drift apart.
//!
//! A read that fails (or an async read that is cancelled) leaves the stream in the middle of a
//! value: the connection cannot be reused after that.

#[cfg(feature = "tokio")]
mod asyncio;
mod sync;

#[cfg(feature = "tokio")]
pub use asyncio::{AsyncWireReader, AsyncWireWriter};
pub use sync::{WireReader, WireWriter};

use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
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
    #[error(
        "settings stream: tag at byte offset {offset} is {tag}, expected 1 (a setting) or 0 (end)"
    )]
    BadSettingsTag { offset: u64, tag: u64 },
    #[error("settings stream: more than {limit} settings (the one at byte offset {offset})")]
    TooManySettings { offset: u64, limit: usize },
}

/// An ordered list of `(name, value)` pairs as sent on a build hook's stdin.
pub type Settings = Vec<(String, String)>;

/// Padding needed after `len` bytes to reach a multiple of 8.
pub fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Zero bytes to append after a string of `len` bytes (`writePadding`).
fn zero_padding(len: usize) -> &'static [u8] {
    const ZEROS: [u8; 8] = [0; 8];
    // `padding` is at most 7, so the range is always in bounds.
    ZEROS.get(..padding(len as u64)).unwrap_or(&[])
}

/// How many bytes a string body is read in at a time. A length prefix is only a claim: the
/// buffer grows as bytes actually arrive, so a generous limit does not let a peer make us
/// allocate the whole claimed length up front.
const READ_CHUNK: usize = 64 * 1024;

/// List capacity reserved before any item has arrived, for the same reason.
const PREALLOC_ITEMS: usize = 1024;

/// Bookkeeping for one `read` call inside an exact read: advances `done` and `offset`, and
/// turns end of input and I/O errors into errors that carry the offset. `Interrupted` is retried.
fn account_read(
    offset: &mut u64,
    done: &mut usize,
    wanted: usize,
    result: std::io::Result<usize>,
) -> Result<(), WireError> {
    match result {
        Ok(0) => Err(WireError::Eof {
            offset: *offset,
            wanted: wanted.saturating_sub(*done) as u64,
        }),
        Ok(n) => {
            *done += n;
            *offset += n as u64;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        Err(source) => Err(WireError::Io {
            offset: *offset,
            source,
        }),
    }
}

/// Checked conversion of a u64 read at `offset` into a narrower type, like `readNum<T>`
/// ("serialised integer %d is too large for type '%s'").
fn convert<T: TryFrom<u64>>(offset: u64, value: u64) -> Result<T, WireError> {
    T::try_from(value).map_err(|_| WireError::Overflow {
        offset,
        value,
        target: std::any::type_name::<T>(),
    })
}

/// Nix reads booleans with `readNum<bool>`, which rejects anything but 0 and 1; some call
/// sites use `readInt` and accept any non-zero value, but Nix itself only ever writes 0 or 1,
/// so we are strict.
fn decode_bool(offset: u64, value: u64) -> Result<bool, WireError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(WireError::Overflow {
            offset,
            value,
            target: "bool",
        }),
    }
}

/// Checks a string length prefix read at `offset` against `limit` before anything is allocated.
fn check_len(offset: u64, len: u64, limit: u64) -> Result<usize, WireError> {
    if len > limit {
        return Err(WireError::TooLong { offset, len, limit });
    }
    convert(offset, len)
}

/// Checks a list count read at `offset` against `limit` (`readStrings` has no bound; we do).
fn check_count(offset: u64, len: u64, limit: usize) -> Result<usize, WireError> {
    let n: usize = convert(offset, len)?;
    if n > limit {
        return Err(WireError::TooManyItems {
            offset,
            len,
            limit: limit as u64,
        });
    }
    Ok(n)
}

/// `readPadding` rejects non-zero padding ("non-zero padding").
fn check_padding(offset: u64, pad: &[u8]) -> Result<(), WireError> {
    if pad.iter().any(|&b| b != 0) {
        return Err(WireError::BadPadding { offset });
    }
    Ok(())
}

/// Grows `buf` towards `len` by at most [`READ_CHUNK`] zero bytes and returns the new part's
/// range for the caller to fill; `None` once `buf` holds `len` bytes.
fn next_chunk(buf: &mut Vec<u8>, len: usize) -> Option<std::ops::Range<usize>> {
    let start = buf.len();
    if start >= len {
        return None;
    }
    let end = start + (len - start).min(READ_CHUNK);
    buf.resize(end, 0);
    Some(start..end)
}

fn decode_utf8(offset: u64, bytes: Vec<u8>) -> Result<String, WireError> {
    String::from_utf8(bytes).map_err(|_| WireError::NotUtf8 { offset })
}

/// Bound for a token read by `expect_str`: a little over the expected length, so that a wrong
/// token of a similar size still shows up in the error instead of a `TooLong`.
fn expect_limit(expected: &str) -> u64 {
    expected.len().max(64) as u64
}

fn check_expected(offset: u64, expected: &str, got: &[u8]) -> Result<(), WireError> {
    if got != expected.as_bytes() {
        return Err(WireError::Unexpected {
            offset,
            expected: format!("{expected:?}"),
            got: String::from_utf8_lossy(got).into_owned(),
        });
    }
    Ok(())
}

/// Interprets one tag of the settings stream read at `offset`, when `count` settings have been
/// read so far: `true` if a setting follows, `false` at the end. The stream is written by
/// `HookInstance::HookInstance` (`src/libstore/build/hook-instance.cc`) and read by
/// `src/build-remote/build-remote.cc` (2.8) as `while (readInt(source)) { name, value }`, which
/// takes any non-zero tag as "more"; Nix only writes 1, so we accept only 1 and 0.
fn settings_tag(offset: u64, tag: u64, count: usize, limit: usize) -> Result<bool, WireError> {
    match tag {
        0 => Ok(false),
        1 if count >= limit => Err(WireError::TooManySettings { offset, limit }),
        1 => Ok(true),
        _ => Err(WireError::BadSettingsTag { offset, tag }),
    }
}

#[cfg(test)]
mod tests;
