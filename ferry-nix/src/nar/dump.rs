//! A file tree on disk to a NAR, byte-identical to `nix-store --dump`.
//!
//! Follows `dumpPath` in `src/libutil/archive.cc` over `PosixSourceAccessor`
//! (`src/libutil/posix-source-accessor.cc`): `lstat` each node (symlinks are never
//! followed, the root included), a regular file is executable when its owner may execute it
//! (`S_IXUSR`), directory entries go out sorted byte-wise, and anything but a regular file,
//! directory or symlink is refused. The macOS case hack (`use-case-hack`) is not applied.

use super::CHUNK;
use super::encode::{NarEncoder, NarWriteError, TeeWriter};
use crate::hash::{Hash, Sha256Sink};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Owner-execute permission bit (`S_IXUSR`).
const S_IXUSR: u32 = 0o100;

/// Writes the NAR of the tree at `path` to `out` and returns its size. Regular files are
/// streamed in chunks. On error the output is incomplete and must be discarded; the error
/// names the file on disk or the NAR path.
pub fn dump_path(path: &Path, out: impl Write) -> Result<u64, NarWriteError> {
    let mut e = NarEncoder::new(out)?;
    let mut buf = vec![0u8; CHUNK];
    dump_node(&mut e, path, &mut buf)?;
    Ok(e.finish()?.1)
}

/// Like [`dump_path`], also hashing the NAR as it streams: returns its SHA-256 (the
/// NarHash) and size.
pub fn dump_path_hashed(path: &Path, out: impl Write) -> Result<(Hash, u64), NarWriteError> {
    let mut tee = TeeWriter::new(out, Sha256Sink::new());
    let size = dump_path(path, &mut tee)?;
    Ok((tee.b.finish(), size))
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> NarWriteError + '_ {
    move |source| NarWriteError::Read {
        path: path.to_owned(),
        source,
    }
}

fn dump_node<W: Write>(
    e: &mut NarEncoder<W>,
    path: &Path,
    buf: &mut [u8],
) -> Result<(), NarWriteError> {
    let md = fs::symlink_metadata(path).map_err(read_err(path))?;
    let ft = md.file_type();
    if ft.is_file() {
        dump_file(e, path, buf)
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(read_err(path))?;
        e.symlink(target.as_os_str().as_bytes())
    } else if ft.is_dir() {
        // Nix collects the names in a `std::map<std::string, …>`: byte-wise order.
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(read_err(path))? {
            names.push(entry.map_err(read_err(path))?.file_name().into_vec());
        }
        names.sort_unstable();
        e.begin_directory()?;
        for name in names {
            // The encoder checks the name, the order and the depth (`MAX_DEPTH`, as Nix's
            // `narMaxDepth` bounds `dumpPath`), naming the NAR path if one is wrong; the
            // depth check also bounds this recursion.
            e.entry(&name)?;
            let child = path.join(std::ffi::OsStr::from_bytes(&name));
            dump_node(e, &child, buf)?;
        }
        e.end_directory()
    } else {
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "unknown"
        };
        Err(NarWriteError::UnsupportedType {
            path: path.to_owned(),
            kind,
        })
    }
}

fn dump_file<W: Write>(
    e: &mut NarEncoder<W>,
    path: &Path,
    buf: &mut [u8],
) -> Result<(), NarWriteError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    // Size and mode from the open file, so they describe what is read.
    let md = f.metadata().map_err(read_err(path))?;
    if !md.is_file() {
        return Err(NarWriteError::Read {
            path: path.to_owned(),
            source: std::io::Error::other("it stopped being a regular file while it was dumped"),
        });
    }
    let size = md.len();
    let executable = md.permissions().mode() & S_IXUSR != 0;
    e.begin_regular(executable, size)?;
    // Read exactly the announced size, as Nix does; a file that shrinks meanwhile is an
    // error, bytes appended meanwhile are not part of the NAR.
    let mut done = 0u64;
    while done < size {
        let want = usize::try_from(size - done)
            .unwrap_or(buf.len())
            .min(buf.len());
        let Some(chunk) = buf.get_mut(..want) else {
            break;
        };
        let n = match f.read(chunk) {
            Ok(0) => {
                return Err(NarWriteError::FileChanged {
                    path: path.to_owned(),
                    expected: size,
                    got: done,
                });
            }
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(NarWriteError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        e.write_contents(chunk.get(..n).unwrap_or_default())?;
        done += n as u64;
    }
    e.end_regular()
}
