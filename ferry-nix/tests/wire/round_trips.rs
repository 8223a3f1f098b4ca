//! Sync and async writers round-trip through both readers (proptest): what is written is what
//! is read, whichever side wrote or read it.

use super::*;

#[derive(Debug, Clone)]
struct Sample {
    strings: Vec<String>,
    bytes: Vec<u8>,
    flag: bool,
    num: u64,
    settings: Vec<(String, String)>,
}

fn sample() -> impl Strategy<Value = Sample> {
    (
        proptest::collection::vec(".{0,20}", 0..12),
        proptest::collection::vec(any::<u8>(), 0..40),
        any::<bool>(),
        any::<u64>(),
        proptest::collection::vec(("[a-z-]{1,12}", ".{0,20}"), 0..6),
    )
        .prop_map(|(strings, bytes, flag, num, settings)| Sample {
            strings,
            bytes,
            flag,
            num,
            settings,
        })
}

macro_rules! write_sample {
    ($w:expr, $s:expr, $($aw:tt)*) => {{
        let (w, s) = ($w, $s);
        w.write_strings(&s.strings)$($aw)*?;
        w.write_bytes(&s.bytes)$($aw)*?;
        w.write_bool(s.flag)$($aw)*?;
        w.write_u64(s.num)$($aw)*?;
        w.write_settings(&s.settings)$($aw)*?;
        std::io::Result::Ok(())
    }};
}

macro_rules! read_sample {
    ($r:expr, $($aw:tt)*) => {{
        let r = $r;
        let strings = r.read_strings(12, 80)$($aw)*?;
        let bytes = r.read_bytes(40)$($aw)*?;
        let flag = r.read_bool()$($aw)*?;
        let num = r.read_u64()$($aw)*?;
        let settings = r.read_settings(6, 80)$($aw)*?;
        Result::<_, WireError>::Ok(Sample { strings, bytes, flag, num, settings })
    }};
}

fn same(a: &Sample, b: &Sample) -> bool {
    (&a.strings, &a.bytes, a.flag, a.num, &a.settings)
        == (&b.strings, &b.bytes, b.flag, b.num, &b.settings)
}

proptest! {
    #[test]
    fn round_trip_sync_and_async(s in sample()) {
        let mut w = WireWriter::new(Vec::new());
        (|| write_sample!(&mut w, &s,))().expect("sync write");
        let bytes = w.into_inner();
        prop_assert_eq!(bytes.len() % 8, 0);

        let mut aw = AsyncWireWriter::new(Vec::new());
        block_on(async { write_sample!(&mut aw, &s, .await) }).expect("async write");
        prop_assert_eq!(&aw.into_inner(), &bytes);

        let mut r = WireReader::new(&bytes[..]);
        let got = (|| read_sample!(&mut r,))().expect("sync read");
        prop_assert!(same(&got, &s), "sync {:?} != {:?}", got, s);
        prop_assert_eq!(r.offset(), bytes.len() as u64);

        let mut ar = AsyncWireReader::new(&bytes[..]);
        let got = block_on(async { read_sample!(&mut ar, .await) }).expect("async read");
        prop_assert!(same(&got, &s), "async {:?} != {:?}", got, s);
        prop_assert_eq!(ar.offset(), bytes.len() as u64);
    }

    #[test]
    fn truncation_is_always_an_error_at_the_cut(s in sample(), cut in any::<prop::sample::Index>()) {
        let mut w = WireWriter::new(Vec::new());
        (|| write_sample!(&mut w, &s,))().expect("write");
        let bytes = w.into_inner();
        let cut = cut.index(bytes.len());
        let short = &bytes[..cut];
        let e = (|| read_sample!(&mut WireReader::new(short),))().expect_err("sync truncated");
        prop_assert!(matches!(e, WireError::Eof { offset, .. } if offset == cut as u64), "{:?}", e);
        let e = block_on(async { read_sample!(&mut AsyncWireReader::new(short), .await) })
            .expect_err("async truncated");
        prop_assert!(matches!(e, WireError::Eof { offset, .. } if offset == cut as u64), "{:?}", e);
    }
}
