//! Hash encodings against what Nix 2.8 printed (`golden/regen-hash.sh`): for each input and
//! algorithm, Ferry computes the same digest, prints base-16, Nix base-32, base-64 and SRI
//! exactly as Nix does, and parses every one of Nix's forms back to the same hash.

use ferry_nix::hash::{Hash, HashAlgo};
use std::path::Path;

#[test]
fn every_encoding_matches_nix() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hash");
    let table = std::fs::read_to_string(dir.join("hashes.txt")).expect("hashes.txt");
    let mut n = 0;
    for line in table.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [input, algo, b16, b32, b64, sri] = f[..] else {
            panic!("bad golden line {line:?}");
        };
        let algo = HashAlgo::from_name(algo).expect("algo");
        let data = std::fs::read(dir.join("inputs").join(input)).expect("input");
        let h = Hash::of(algo, &data);
        assert_eq!(h.to_base16(), b16, "{input}");
        assert_eq!(h.to_nix32(), b32, "{input}");
        assert_eq!(h.to_base64(), b64, "{input}");
        assert_eq!(h.to_sri(), sri, "{input}");
        let name = algo.name();
        for form in [
            format!("{name}:{b16}"),
            format!("{name}:{b32}"),
            format!("{name}:{b64}"),
            sri.to_owned(),
        ] {
            assert_eq!(Hash::parse_any_prefixed(&form).expect(&form), h, "{form}");
        }
        for bare in [b16, b32, b64] {
            assert_eq!(Hash::parse_non_sri_unprefixed(bare, algo).expect(bare), h);
        }
        n += 1;
    }
    assert_eq!(n, 6);
}
