//! NAR compression. zstd by default: uploads are compression-bound and zstd −3 runs at about
//! 123 MiB/s per core against xz −6's 1.3 MiB/s (docs/upload.md §5.1), for ≤ 10% more bytes.
//! xz is there for caches whose readers predate zstd support (Nix < 2.4 cannot read
//! `.nar.zst`); it is Nix's own default for binary caches, at the same preset 6
//! (`compression.cc`, `XzCompressionSink`: `lzma_easy_encoder(…, 6, LZMA_CHECK_CRC64)`).

use serde::Deserialize;
use std::io::{self, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// From a narinfo / store-parameter name.
    pub fn from_name(name: &str) -> Option<Compression> {
        match name {
            "zstd" => Some(Compression::Zstd),
            "xz" => Some(Compression::Xz),
            "none" => Some(Compression::None),
            _ => None,
        }
    }

    /// The narinfo `Compression:` value.
    pub fn narinfo_name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        }
    }

    /// The NAR file extension Nix uses for it (`nar/<hash>.nar<ext>`,
    /// `BinaryCacheStore::addToStoreCommon`).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
            Compression::None => "",
        }
    }
}

/// A writer compressing into `W`; `finish` flushes the trailer and returns `W`.
pub enum Compressor<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    None(W),
}

/// Compression levels, per algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels {
    pub zstd: i32,
    pub xz: u32,
}

impl Default for Levels {
    fn default() -> Self {
        Levels { zstd: 3, xz: 6 }
    }
}

impl<W: Write> Compressor<W> {
    pub fn new(c: Compression, levels: Levels, inner: W) -> io::Result<Self> {
        Ok(match c {
            Compression::Zstd => {
                Compressor::Zstd(zstd::stream::write::Encoder::new(inner, levels.zstd)?)
            }
            Compression::Xz => Compressor::Xz(liblzma::write::XzEncoder::new(inner, levels.xz)),
            Compression::None => Compressor::None(inner),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(e) => e.finish(),
            Compressor::Xz(e) => e.finish(),
            Compressor::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Xz(e) => e.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Xz(e) => e.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_round_trip() {
        let data = b"nix-archive-1".repeat(1000);
        let mut c = Compressor::new(Compression::Zstd, Levels::default(), Vec::new()).expect("new");
        c.write_all(&data).expect("write");
        let out = c.finish().expect("finish");
        assert!(out.len() < data.len() / 10);
        assert_eq!(zstd::decode_all(&out[..]).expect("decode"), data);
        let mut c = Compressor::new(Compression::None, Levels::default(), Vec::new()).expect("new");
        c.write_all(&data).expect("write");
        assert_eq!(c.finish().expect("finish"), data);
    }

    #[test]
    fn xz_round_trip_in_pieces() {
        // Text plus incompressible bytes, written in uneven pieces as the NAR encoder does.
        let mut data = b"nix-archive-1\0\0\0".repeat(5000);
        let mut x: u32 = 12345;
        data.extend((0..100_000).map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        }));
        for level in [0, 6] {
            let mut c = Compressor::new(Compression::Xz, Levels { zstd: 3, xz: level }, Vec::new())
                .expect("new");
            for chunk in data.chunks(7919) {
                c.write_all(chunk).expect("write");
            }
            let out = c.finish().expect("finish");
            // An xz stream (magic FD 37 7A 58 5A 00), smaller than the input.
            assert_eq!(&out[..6], b"\xfd7zXZ\0");
            assert!(out.len() < data.len(), "{} >= {}", out.len(), data.len());
            let mut back = Vec::new();
            std::io::copy(&mut liblzma::read::XzDecoder::new(&out[..]), &mut back).expect("decode");
            assert_eq!(back, data);
        }
        assert_eq!(Compression::from_name("xz"), Some(Compression::Xz));
        assert_eq!(Compression::Xz.extension(), ".xz");
        assert_eq!(Compression::from_name("bzip2"), None);
    }
}
