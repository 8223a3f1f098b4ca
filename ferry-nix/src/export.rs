//! What the local import tools read on their stdin: the `nix-store --export` stream that
//! `nix-store --import` takes, and the input of `nix-store --register-validity`.

use crate::serve::PathInfo;
use crate::store_path::StoreDir;
use crate::wire::WireWriter;

/// The part of the `nix-store --export` stream (2.8 `Store::exportPath` / `importPaths`)
/// before one object's NAR: `1`.
pub const EXPORT_OBJECT_START: [u8; 8] = 1u64.to_le_bytes();

/// The part of the export stream after one object's NAR: `0x4558494e, path, references,
/// deriver, 0`. The stream ends with another `0`.
pub fn export_trailer(info: &PathInfo, store_dir: &StoreDir) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    // Writes to a Vec cannot fail.
    let _ = (|| -> std::io::Result<()> {
        w.write_u64(0x4558_494e)?;
        w.write_str(&store_dir.display(&info.path))?;
        w.write_strings(info.references.iter().map(|r| store_dir.display(r)))?;
        let deriver = info.deriver.as_ref().map(|d| store_dir.display(d));
        w.write_str(deriver.as_deref().unwrap_or(""))?;
        w.write_u64(0)
    })();
    w.into_inner()
}

/// The stdin of `nix-store --register-validity` without `--hash-given` (2.8
/// `decodeValidPathInfo`): per path its absolute path, its deriver (empty line if none),
/// the number of references, then one reference per line. `infos` in the order given
/// (references first: Nix registers them in one transaction either way, but keep the order
/// a reader expects).
pub fn register_validity_input(infos: &[&PathInfo], store_dir: &StoreDir) -> String {
    let mut s = String::new();
    for i in infos {
        s.push_str(&store_dir.display(&i.path));
        s.push('\n');
        if let Some(d) = &i.deriver {
            s.push_str(&store_dir.display(d));
        }
        s.push('\n');
        s.push_str(&i.references.len().to_string());
        s.push('\n');
        for r in &i.references {
            s.push_str(&store_dir.display(r));
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_golden::{info, sd, sp};

    #[test]
    fn export_trailer_layout() {
        let (a, b) = (sp('a', "a"), sp('b', "b"));
        let i = info(&a, &[&b]);
        assert_eq!(EXPORT_OBJECT_START, 1u64.to_le_bytes());
        let t = export_trailer(&i, &sd());
        assert_eq!(&t[..8], &0x4558_494eu64.to_le_bytes());
        let shown = sd().display(&a);
        assert_eq!(&t[8..16], &(shown.len() as u64).to_le_bytes());
        assert_eq!(&t[16..16 + shown.len()], shown.as_bytes());
        // No deriver (an empty string), then the end of the object.
        assert_eq!(&t[t.len() - 16..], &[0u8; 16]);
    }

    #[test]
    fn register_validity_input_layout() {
        let (out, dev, lib, drv) = (
            sp('a', "p"),
            sp('b', "p-dev"),
            sp('c', "lib"),
            sp('d', "p.drv"),
        );
        let mut o = info(&out, &[&lib, &out]);
        o.deriver = Some(drv.clone());
        let d = info(&dev, &[&out]);
        let text = register_validity_input(&[&o, &d], &sd());
        let (a, b, c, dd) = (
            sd().display(&out),
            sd().display(&dev),
            sd().display(&lib),
            sd().display(&drv),
        );
        // References in path order (hash part a < c), the self-reference included.
        assert_eq!(text, format!("{a}\n{dd}\n2\n{a}\n{c}\n{b}\n\n1\n{a}\n"));
        assert_eq!(register_validity_input(&[], &sd()), "");
    }
}
