use super::*;

fn sd() -> StoreDir {
    StoreDir::new("/nix/store").expect("store dir")
}

const OUT: &str = "/nix/store/2cxgbxdxsf3288df7g54ja8anlmn0psb-hello";
const SRC: &str = "/nix/store/3g0l9r3lx2nay67fwy7xgkj8hf33qhg4-src";

fn sample() -> String {
    format!(
        r#"Derive([("out","{OUT}","","")],[],["{SRC}"],"x86_64-linux","/bin/sh",["-c","echo \"a\\b\"\n\t\r"],[("out","{OUT}"),("x","y")])"#
    )
}

#[test]
fn round_trip() {
    let text = sample();
    let d = Derivation::parse(text.as_bytes(), &sd()).expect("parse");
    assert_eq!(
        d.args,
        vec!["-c".to_owned(), "echo \"a\\b\"\n\t\r".to_owned()]
    );
    assert_eq!(d.outputs["out"].kind(), OutputKind::InputAddressed);
    assert_eq!(d.render(&sd()), text);
}

#[test]
fn errors_name_offsets() {
    let text = sample();
    // Truncated anywhere: always a Truncated or a clear Expected at the end.
    for cut in 0..text.len() {
        let e = Derivation::parse(&text.as_bytes()[..cut], &sd()).expect_err("truncated");
        assert!(
            matches!(e, DerivationError::Truncated { offset, .. } if offset == cut),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn wire_encoding() {
    let d = Derivation::parse(sample().as_bytes(), &sd()).expect("parse");
    let b = d.to_basic().to_wire(&sd());
    let mut r = crate::wire::WireReader::new(&b[..]);
    assert_eq!(r.read_u64().expect("n"), 1);
    assert_eq!(r.read_string(100).expect("s"), "out");
    assert_eq!(r.read_string(100).expect("s"), OUT);
    assert_eq!(r.read_string(100).expect("s"), "");
    assert_eq!(r.read_string(100).expect("s"), "");
    assert_eq!(r.read_strings(10, 100).expect("srcs"), vec![SRC.to_owned()]);
    assert_eq!(r.read_string(100).expect("s"), "x86_64-linux");
    assert_eq!(r.read_string(100).expect("s"), "/bin/sh");
    assert_eq!(r.read_strings(10, 100).expect("args").len(), 2);
    assert_eq!(r.read_u64().expect("n"), 2);
}
