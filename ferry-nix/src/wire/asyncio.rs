//! The tokio front end: the same methods, bounds, offsets and errors as
//! [`super::WireReader`]/[`super::WireWriter`], over `AsyncRead`/`AsyncWrite`. Only moves
//! bytes; the checks live in the parent module.

use super::{
    PREALLOC_ITEMS, Settings, WireError, account_read, check_count, check_expected, check_len,
    check_padding, convert, decode_bool, decode_utf8, expect_limit, next_chunk, padding,
    settings_tag, zero_padding,
};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

/// An asynchronous reader that counts the bytes it consumed, so every error names its offset.
pub struct AsyncWireReader<R> {
    inner: R,
    offset: u64,
}

impl<R: AsyncRead + Unpin> AsyncWireReader<R> {
    pub fn new(inner: R) -> Self {
        AsyncWireReader { inner, offset: 0 }
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
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        let (wanted, mut done) = (buf.len(), 0);
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            let result = self.inner.read(rest).await;
            account_read(&mut self.offset, &mut done, wanted, result)?;
        }
        Ok(())
    }

    pub async fn read_u64(&mut self) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a u64 and converts it to `T`, failing with [`WireError::Overflow`] if it does not
    /// fit (Nix's `readNum<T>`).
    pub async fn read_num<T: TryFrom<u64>>(&mut self) -> Result<T, WireError> {
        let at = self.offset;
        convert(at, self.read_u64().await?)
    }

    /// Reads a u64 that must fit in a `usize` (counts, sizes used for indexing).
    pub async fn read_usize(&mut self) -> Result<usize, WireError> {
        self.read_num().await
    }

    /// Reads a boolean: 0 or 1, anything else is [`WireError::Overflow`].
    pub async fn read_bool(&mut self) -> Result<bool, WireError> {
        let at = self.offset;
        decode_bool(at, self.read_u64().await?)
    }

    /// Reads the zero padding after a string of `len` bytes; non-zero padding is an error,
    /// as in `readPadding`.
    pub async fn read_padding(&mut self, len: u64) -> Result<(), WireError> {
        let at = self.offset;
        let mut b = [0u8; 8];
        let pad = &mut b[..padding(len)];
        self.read_exact(pad).await?;
        check_padding(at, pad)
    }

    /// Reads a length-prefixed byte string of at most `limit` bytes.
    pub async fn read_bytes(&mut self, limit: u64) -> Result<Vec<u8>, WireError> {
        let at = self.offset;
        let len = check_len(at, self.read_u64().await?, limit)?;
        let mut v = Vec::new();
        while let Some(range) = next_chunk(&mut v, len) {
            self.read_exact(&mut v[range]).await?;
        }
        self.read_padding(len as u64).await?;
        Ok(v)
    }

    /// Reads a UTF-8 string of at most `limit` bytes.
    pub async fn read_string(&mut self, limit: u64) -> Result<String, WireError> {
        let at = self.offset;
        let b = self.read_bytes(limit).await?;
        decode_utf8(at, b)
    }

    /// Reads a list of strings (`readStrings`): a count of at most `max_items`, then that many
    /// strings of at most `max_len` bytes each.
    pub async fn read_strings(
        &mut self,
        max_items: usize,
        max_len: u64,
    ) -> Result<Vec<String>, WireError> {
        let at = self.offset;
        let n = check_count(at, self.read_u64().await?, max_items)?;
        let mut v = Vec::with_capacity(n.min(PREALLOC_ITEMS));
        for _ in 0..n {
            v.push(self.read_string(max_len).await?);
        }
        Ok(v)
    }

    /// Reads a string and checks it equals `expected` (NAR tokens, protocol tags).
    pub async fn expect_str(&mut self, expected: &str) -> Result<(), WireError> {
        let at = self.offset;
        let got = self.read_bytes(expect_limit(expected)).await?;
        check_expected(at, expected, &got)
    }

    /// Reads the build-hook settings stream (docs/hook-protocol.md §1.3): `1, name, value` per
    /// setting, then `0`. At most `max_settings` settings; names and values at most `max_len`
    /// bytes each. The order of the stream is kept.
    pub async fn read_settings(
        &mut self,
        max_settings: usize,
        max_len: u64,
    ) -> Result<Settings, WireError> {
        let mut settings = Vec::new();
        loop {
            let at = self.offset;
            let tag = self.read_u64().await?;
            if !settings_tag(at, tag, settings.len(), max_settings)? {
                return Ok(settings);
            }
            let name = self.read_string(max_len).await?;
            let value = self.read_string(max_len).await?;
            settings.push((name, value));
        }
    }
}

impl<R: AsyncBufRead + Unpin> AsyncWireReader<R> {
    /// The bytes buffered after the current offset, reading more if there are none; empty at
    /// end of input. Nothing is consumed until [`consume`](Self::consume): for values whose end
    /// only their own grammar finds (a NAR after `DumpStorePath`), so that the bytes after
    /// them stay in the stream.
    pub async fn fill_buf(&mut self) -> Result<&[u8], WireError> {
        let offset = self.offset;
        loop {
            match self.inner.fill_buf().await {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(WireError::Io { offset, source }),
                Ok(_) => break,
            }
        }
        // The bytes are buffered now (or the input is at its end), so this does no I/O; it
        // is called again because returning the first call's slice from inside the loop does
        // not borrow-check.
        self.inner
            .fill_buf()
            .await
            .map_err(|source| WireError::Io { offset, source })
    }

    /// Consumes `n` bytes of what [`fill_buf`](Self::fill_buf) returned.
    pub fn consume(&mut self, n: usize) {
        self.inner.consume(n);
        self.offset += n as u64;
    }
}

/// An asynchronous writer of wire values.
pub struct AsyncWireWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> AsyncWireWriter<W> {
    pub fn new(inner: W) -> Self {
        AsyncWireWriter { inner }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub async fn write_u64(&mut self, v: u64) -> std::io::Result<()> {
        self.inner.write_all(&v.to_le_bytes()).await
    }

    pub async fn write_bool(&mut self, b: bool) -> std::io::Result<()> {
        self.write_u64(u64::from(b)).await
    }

    pub async fn write_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.write_u64(b.len() as u64).await?;
        self.inner.write_all(b).await?;
        self.inner.write_all(zero_padding(b.len())).await
    }

    pub async fn write_str(&mut self, s: &str) -> std::io::Result<()> {
        self.write_bytes(s.as_bytes()).await
    }

    /// Writes a count, then each string (`writeStrings`); works for slices, `Vec`s and sets.
    pub async fn write_strings<I>(&mut self, items: I) -> std::io::Result<()>
    where
        I: IntoIterator,
        I::IntoIter: ExactSizeIterator,
        I::Item: AsRef<str>,
    {
        let items = items.into_iter();
        self.write_u64(items.len() as u64).await?;
        for s in items {
            self.write_str(s.as_ref()).await?;
        }
        Ok(())
    }

    /// Writes a build-hook settings stream: `1, name, value` per setting, then `0`.
    pub async fn write_settings<N, V>(&mut self, settings: &[(N, V)]) -> std::io::Result<()>
    where
        N: AsRef<str>,
        V: AsRef<str>,
    {
        for (name, value) in settings {
            self.write_u64(1).await?;
            self.write_str(name.as_ref()).await?;
            self.write_str(value.as_ref()).await?;
        }
        self.write_u64(0).await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().await
    }
}
