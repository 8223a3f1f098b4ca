//! Unit tests of the shared helpers and of the sync front end on hand-made bytes. The async
//! front end and real Nix bytes are covered in `ferry-nix/tests/wire.rs`.

use super::*;

fn u64s(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn padding_rounds_up_to_eight() {
    let got: Vec<usize> = (0..=9).map(padding).collect();
    assert_eq!(got, [0, 7, 6, 5, 4, 3, 2, 1, 0, 7]);
    assert_eq!(zero_padding(3), &[0u8; 5]);
    assert_eq!(zero_padding(16), &[] as &[u8]);
}

#[test]
fn string_layout_matches_write_string() {
    let mut w = WireWriter::new(Vec::new());
    w.write_str("abc").expect("write");
    let mut want = u64s(&[3]);
    want.extend_from_slice(b"abc\0\0\0\0\0");
    assert_eq!(w.into_inner(), want);
}

#[test]
fn convert_names_the_target_type() {
    let e = convert::<u32>(16, u64::from(u32::MAX) + 1).expect_err("overflow");
    assert!(
        matches!(
            e,
            WireError::Overflow {
                offset: 16,
                target: "u32",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("does not fit in u32"), "{e}");
    assert_eq!(convert::<u8>(0, 255).expect("fits"), 255u8);
}

#[test]
fn bools_are_zero_or_one() {
    let bytes = u64s(&[0, 1, 2]);
    let mut r = WireReader::new(&bytes[..]);
    assert!(!r.read_bool().expect("0"));
    assert!(r.read_bool().expect("1"));
    let e = r.read_bool().expect_err("2");
    assert!(
        matches!(
            e,
            WireError::Overflow {
                offset: 16,
                value: 2,
                target: "bool"
            }
        ),
        "{e:?}"
    );
}

#[test]
fn read_num_checks_the_range() {
    let bytes = u64s(&[300, 7]);
    let mut r = WireReader::new(&bytes[..]);
    let e = r.read_num::<u8>().expect_err("300 > u8");
    assert!(
        matches!(
            e,
            WireError::Overflow {
                offset: 0,
                value: 300,
                target: "u8"
            }
        ),
        "{e:?}"
    );
    assert_eq!(r.read_usize().expect("7"), 7);
}

#[test]
fn chunks_grow_only_as_needed() {
    let mut v = Vec::new();
    let len = READ_CHUNK * 2 + 5;
    let mut ranges = Vec::new();
    while let Some(r) = next_chunk(&mut v, len) {
        ranges.push(r);
    }
    assert_eq!(
        ranges,
        [
            0..READ_CHUNK,
            READ_CHUNK..2 * READ_CHUNK,
            2 * READ_CHUNK..len
        ]
    );
    assert_eq!(v.len(), len);
    assert_eq!(next_chunk(&mut Vec::new(), 0), None);
}

#[test]
fn settings_tags() {
    assert!(settings_tag(0, 1, 0, 1).expect("room for one"));
    assert!(!settings_tag(0, 0, 1, 1).expect("end"));
    let e = settings_tag(8, 1, 1, 1).expect_err("full");
    assert!(
        matches!(
            e,
            WireError::TooManySettings {
                offset: 8,
                limit: 1
            }
        ),
        "{e:?}"
    );
    let e = settings_tag(24, 2, 0, 9).expect_err("bad tag");
    assert!(
        matches!(e, WireError::BadSettingsTag { offset: 24, tag: 2 }),
        "{e:?}"
    );
    assert!(e.to_string().contains("byte offset 24 is 2"), "{e}");
}

#[test]
fn expect_str_reports_what_came() {
    let mut w = WireWriter::new(Vec::new());
    w.write_str("nix-archive-2").expect("write");
    let bytes = w.into_inner();
    let e = WireReader::new(&bytes[..])
        .expect_str("nix-archive-1")
        .expect_err("mismatch");
    assert!(
        e.to_string()
            .contains("\"nix-archive-1\" at byte offset 0, got \"nix-archive-2\""),
        "{e}"
    );
    WireReader::new(&bytes[..])
        .expect_str("nix-archive-2")
        .expect("match");
}

#[test]
fn io_errors_carry_the_offset() {
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("boom"));
            }
            let n = self.0.min(buf.len());
            self.0 -= n;
            buf[..n].fill(0);
            Ok(n)
        }
    }
    let mut r = WireReader::new(Failing(8));
    r.read_u64().expect("first");
    let e = r.read_u64().expect_err("second");
    assert!(matches!(e, WireError::Io { offset: 8, .. }), "{e:?}");
    assert!(e.to_string().contains("byte offset 8: boom"), "{e}");
}

/// `fill_buf` shows buffered bytes without consuming them; `consume` counts what was taken,
/// so offsets of later reads and errors stay right after a grammar-delimited value.
#[test]
fn fill_buf_and_consume_keep_the_offset() {
    let mut bytes = b"NAR?".to_vec();
    bytes.extend(u64s(&[7]));
    let mut r = WireReader::new(std::io::BufReader::with_capacity(3, &bytes[..]));
    assert_eq!(r.fill_buf().expect("fill"), b"NAR");
    r.consume(2);
    assert_eq!(r.offset(), 2);
    assert_eq!(r.fill_buf().expect("fill"), b"R");
    r.consume(1);
    let mut rest = [0u8; 1];
    r.read_exact(&mut rest).expect("read");
    assert_eq!(&rest, b"?");
    assert_eq!(r.read_u64().expect("u64"), 7);
    assert_eq!(r.offset(), 12);
    assert!(r.fill_buf().expect("end").is_empty());
    let e = r.read_u64().expect_err("end of input");
    assert!(matches!(e, WireError::Eof { offset: 12, .. }), "{e}");
}
