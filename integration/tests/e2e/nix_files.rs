//! The flake, NixOS module and VM tests cannot be built here (no nixpkgs, no VMs), but every
//! .nix file must at least parse with the real Nix, so a typo does not reach users' CI (the
//! module is also evaluated: nixos_module.rs).

#[test]
fn flake_module_and_vm_tests_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("flake.nix")];
    for dir in ["vm-tests", "nix", "nix/tests", "nix/tests/scenarios"] {
        for e in std::fs::read_dir(root.join(dir)).expect(dir) {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "nix") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 15, "{files:?}");
    for f in files {
        let out = std::process::Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&f)
            .output()
            .expect("nix-instantiate");
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
