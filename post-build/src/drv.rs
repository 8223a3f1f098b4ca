//! A `.drv`'s output paths, for Nix 2.8.0, which runs the post-build hook with an empty
//! `OUT_PATHS` (NixOS/nix#6446): the hook reads the outputs from `DRV_PATH` itself, with the
//! shared ATerm parser of `ferry_nix::derivation`. Floating content-addressed outputs have no
//! path yet and are skipped.

use ferry_nix::derivation::{Derivation, DerivationError};
use ferry_nix::store_path::StoreDir;

/// `(output name, absolute output path)` of every output with a known path.
pub(crate) fn outputs(
    text: &[u8],
    store_dir: &StoreDir,
) -> Result<Vec<(String, String)>, DerivationError> {
    let drv = Derivation::parse(text, store_dir)?;
    Ok(drv
        .outputs
        .iter()
        .filter_map(|(name, o)| {
            o.path
                .as_ref()
                .map(|p| (name.clone(), store_dir.display(p)))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_outputs_with_paths() {
        let sd = StoreDir::new("/nix/store").expect("store dir");
        let text = br#"Derive([("dev","/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev","",""),("out","/nix/store/1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo \"hi\" > $out"],[("out","/nix/store/1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")])"#;
        let o = outputs(text, &sd).expect("parse");
        assert_eq!(
            o,
            vec![
                (
                    "dev".to_owned(),
                    "/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev".to_owned()
                ),
                (
                    "out".to_owned(),
                    "/nix/store/1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn garbage_names_the_offset() {
        let sd = StoreDir::new("/nix/store").expect("store dir");
        let e = outputs(b"Derive([(\"out\"", &sd).unwrap_err();
        assert!(
            e.to_string().contains("14") || e.to_string().contains("offset"),
            "{e}"
        );
    }
}
