//! NAR compression. zstd by default: uploads are compression-bound and zstd −3 runs at about
//! 123 MiB/s per core against xz −6's 1.3 MiB/s (docs/upload.md §5.1), for ≤ 10% more bytes.
//! xz is there for caches whose readers predate zstd support (Nix < 2.4 cannot read
//! `.nar.zst`); it is Nix's own default for binary caches, at the same preset 6
//! (`compression.cc`, `XzCompressionSink`: `lzma_easy_encoder(…, 6, LZMA_CHECK_CRC64)`).

use serde::Deserialize;
use std::io::{self, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compression {
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// From a narinfo / store-parameter name.
    pub(crate) fn from_name(name: &str) -> Option<Compression> {
        match name {
            "zstd" => Some(Compression::Zstd),
            "xz" => Some(Compression::Xz),
            "none" => Some(Compression::None),
            _ => None,
        }
    }

    /// The narinfo `Compression:` value.
    pub(crate) fn narinfo_name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        }
    }

    /// The NAR file extension Nix uses for it (`nar/<hash>.nar<ext>`,
    /// `BinaryCacheStore::addToStoreCommon`).
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
            Compression::None => "",
        }
    }
}

/// Input per zstd worker job (see [`Compressor::new`]).
const ZSTD_JOB_BYTES: u32 = 2 << 20;

/// A writer compressing into `W`; `finish` flushes the trailer and returns `W`.
pub(crate) enum Compressor<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    None(W),
}

/// Compression levels, per algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Levels {
    pub(crate) zstd: i32,
    pub(crate) xz: u32,
    /// zstd worker threads per NAR (0 or 1: compress on the calling thread). One large path
    /// would otherwise use one core however many the machine has; zstd's multi-threaded
    /// output does not depend on the number of workers (zstd.h, `ZSTD_c_nbWorkers`), so a
    /// NAR compressed again after a restart is the same file and a resumed multipart upload
    /// still fits it.
    pub(crate) zstd_threads: u32,
}

/// NARs smaller than this are compressed on one thread whatever `zstd_threads` says: several
/// are compressed side by side anyway (the compression slots), and zstd's workers would add a
/// copy of the input into their jobs and a hand-off per job for nothing. Far below the
/// multipart threshold's default (64 MiB), and a function of the NAR alone, so the same NAR
/// always compresses to the same file.
pub(crate) const MULTITHREAD_MIN_BYTES: u64 = 16 << 20;

impl Levels {
    /// The levels for a NAR of `nar_size` bytes.
    pub(crate) fn for_nar(self, nar_size: u64) -> Levels {
        if nar_size < MULTITHREAD_MIN_BYTES {
            Levels {
                zstd_threads: 0,
                ..self
            }
        } else {
            self
        }
    }
}

impl Default for Levels {
    fn default() -> Self {
        Levels {
            zstd: 3,
            xz: 6,
            zstd_threads: 0,
        }
    }
}

impl<W: Write> Compressor<W> {
    pub(crate) fn new(c: Compression, levels: Levels, inner: W) -> io::Result<Self> {
        Ok(match c {
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(inner, levels.zstd)?;
                // One worker would only hand each job to another thread of the same core.
                if levels.zstd_threads > 1 {
                    e.multithread(levels.zstd_threads)?;
                    // zstd's default job is several windows long and each worker holds its
                    // input and output: about 100 MiB with two workers. Small jobs keep the
                    // uploader's memory flat (the large-output test bounds it) for a ratio
                    // a fraction of a percent worse.
                    e.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_BYTES))?;
                }
                Compressor::Zstd(e)
            }
            Compression::Xz => Compressor::Xz(liblzma::write::XzEncoder::new(inner, levels.xz)),
            Compression::None => Compressor::None(inner),
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
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
            let mut c = Compressor::new(
                Compression::Xz,
                Levels {
                    xz: level,
                    ..Levels::default()
                },
                Vec::new(),
            )
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

#[cfg(test)]
mod threads {
    use super::*;

    /// A resumed multipart upload is cheapest when this holds: the same NAR compressed with
    /// another number of zstd workers is the same file, so its recorded parts still apply.
    /// (Were it another file, it would have another key: the old upload is aborted and a new
    /// one starts, nothing wrong is assembled.)
    #[test]
    fn zstd_output_does_not_depend_on_the_number_of_workers() {
        let data: Vec<u8> = (0..12u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x3f)
            .collect();
        let run = |threads: u32| {
            let levels = Levels {
                zstd_threads: threads,
                ..Levels::default()
            };
            let mut c = Compressor::new(Compression::Zstd, levels, Vec::new()).expect("zstd");
            c.write_all(&data).expect("write");
            c.finish().expect("finish")
        };
        let two = run(2);
        assert_eq!(two, run(3));
        assert_eq!(two, run(4));
        assert_eq!(zstd::decode_all(&two[..]).expect("decode"), data);
        assert_eq!(zstd::decode_all(&run(1)[..]).expect("decode"), data);
    }
}

#[cfg(test)]
mod small {
    use super::*;

    #[test]
    fn small_nars_are_compressed_on_one_thread() {
        let many = Levels {
            zstd_threads: 4,
            ..Levels::default()
        };
        assert_eq!(many.for_nar(0).zstd_threads, 0);
        assert_eq!(many.for_nar(MULTITHREAD_MIN_BYTES - 1).zstd_threads, 0);
        assert_eq!(many.for_nar(MULTITHREAD_MIN_BYTES).zstd_threads, 4);
        assert_eq!(many.for_nar(MULTITHREAD_MIN_BYTES).zstd, many.zstd);
    }
}
