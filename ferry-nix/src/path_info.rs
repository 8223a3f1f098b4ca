//! Path infos as Nix's command-line tools print them (`nix path-info --json`), and the
//! order a closure is copied or uploaded in (references first).

use crate::hash::Hash;
use crate::serve::PathInfo;
use crate::store_path::{StoreDir, StorePath, StorePathError};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// A path info that cannot be read, or a closure that cannot be ordered.
#[derive(Debug, Error)]
pub enum PathInfoError {
    #[error("path info of {path} from `nix path-info --json`: {problem}")]
    BadInfo { path: String, problem: String },
    #[error("`nix path-info --json` printed something that is not its JSON: {0}")]
    BadJson(String),
    #[error("{path} is not valid in the local store")]
    NotValid { path: String },
    #[error("{0}")]
    BadPath(#[from] StorePathError),
    #[error("the references of {paths:?} form a cycle")]
    Cycle { paths: Vec<String> },
}

/// Orders `infos` so that every path comes after the paths it references (self-references
/// ignored); references outside the set are taken as already present. Ties keep name order,
/// so the result is deterministic.
pub fn topo_sort(infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, PathInfoError> {
    let mut pending: BTreeMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready: Vec<StorePath> = pending
            .iter()
            .filter(|(p, info)| {
                info.references
                    .iter()
                    .all(|r| r == *p || !pending.contains_key(r))
            })
            .map(|(p, _)| p.clone())
            .collect();
        if ready.is_empty() {
            return Err(PathInfoError::Cycle {
                paths: pending.keys().map(ToString::to_string).collect(),
            });
        }
        for p in ready {
            if let Some(i) = pending.remove(&p) {
                out.push(i);
            }
        }
    }
    Ok(out)
}

/// Parses `nix path-info --json` output, in each shape Nix has printed:
/// - Nix 2.8 to 2.18: an array of objects, each with `path`; an invalid path has
///   `"valid": false`;
/// - Nix 2.19 to 2.33, and `--json-format 1`: an object keyed by absolute store path, `null`
///   for an invalid path (2.34 adds `storeDir` and `version` inside each entry);
/// - `--json-format 2` (Nix 2.34): `{"info": {<base name>: {...} | null}, "storeDir": ...,
///   "version": 2}`, references and deriver may be base names, and `ca` an object
///   `{"method": "nar" | "flat" | "text", "hash": <SRI>}`.
///
/// Each entry has `narHash` (SRI since 2.4, `sha256:` nix32 before), `narSize`,
/// `references`, optional `deriver`, `ca`, `signatures`. The shapes are told apart by their
/// structure, not by the Nix version, so a store reached through another Nix still parses.
/// Sources: `src/nix/path-info.cc` and `src/libstore/path-info.cc` (`UnkeyedValidPathInfo::toJSON`)
/// in <https://github.com/NixOS/nix>.
pub fn parse_path_info_json(
    text: &str,
    store_dir: &StoreDir,
) -> Result<Vec<PathInfo>, PathInfoError> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(text).map_err(|e| PathInfoError::BadJson(e.to_string()))?;
    // (path as printed, entry): `None` for an invalid path.
    let mut entries: Vec<(String, Option<&Value>)> = Vec::new();
    // Store directory prefix for base names (format 2).
    let mut base_dir: Option<String> = None;
    match &v {
        Value::Array(a) => {
            for item in a {
                let path = item
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        PathInfoError::BadJson("an array entry without \"path\"".into())
                    })?
                    .to_owned();
                let valid = item.get("valid").and_then(Value::as_bool) != Some(false);
                entries.push((path, valid.then_some(item)));
            }
        }
        Value::Object(o) if o.get("info").is_some_and(Value::is_object) => {
            let dir = o
                .get("storeDir")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| store_dir.to_string());
            if let Some(Value::Object(info)) = o.get("info") {
                for (k, item) in info {
                    let path = if k.starts_with('/') {
                        k.clone()
                    } else {
                        format!("{}/{k}", dir.trim_end_matches('/'))
                    };
                    entries.push((path, item.is_object().then_some(item)));
                }
            }
            base_dir = Some(dir);
        }
        Value::Object(o) => {
            for (k, item) in o {
                match item {
                    Value::Object(_) => entries.push((k.clone(), Some(item))),
                    Value::Null => entries.push((k.clone(), None)),
                    _ => {
                        return Err(PathInfoError::BadJson(format!(
                            "the entry of {k:?} is neither an object nor null"
                        )));
                    }
                }
            }
        }
        _ => {
            return Err(PathInfoError::BadJson(
                "neither an array nor an object".into(),
            ));
        }
    }
    let full = |p: &str| -> String {
        match &base_dir {
            Some(d) if !p.starts_with('/') => format!("{}/{p}", d.trim_end_matches('/')),
            _ => p.to_owned(),
        }
    };
    let mut out = Vec::new();
    for (path_text, item) in entries {
        let Some(item) = item else {
            return Err(PathInfoError::NotValid { path: path_text });
        };
        let bad = |problem: &str| PathInfoError::BadInfo {
            path: path_text.clone(),
            problem: problem.to_owned(),
        };
        let path = store_dir.parse(&path_text)?;
        let hash_text = item
            .get("narHash")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no narHash"))?;
        let nar_hash = Hash::parse_any_prefixed(hash_text)
            .map_err(|e| bad(&format!("narHash {hash_text:?}: {e}")))?;
        let nar_size = item
            .get("narSize")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no narSize"))?;
        let strings = |key: &str| -> Vec<String> {
            item.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let references = strings("references")
            .iter()
            .map(|r| store_dir.parse(&full(r)))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let deriver = item
            .get("deriver")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
            .map(|d| store_dir.parse(&full(d)))
            .transpose()?;
        let ca = match item.get("ca") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) if c.is_empty() => None,
            Some(Value::String(c)) => Some(c.clone()),
            Some(obj @ Value::Object(_)) => Some(ca_from_json_object(obj).map_err(|p| bad(&p))?),
            Some(_) => return Err(bad("ca is neither a string nor an object")),
        };
        out.push(PathInfo {
            deriver,
            ca,
            references,
            sigs: strings("signatures").into_iter().collect(),
            path,
            nar_hash,
            nar_size,
        });
    }
    Ok(out)
}

/// The textual content address (`fixed:r:sha256:<nix32>`, the form of narinfo `CA:` and the
/// serve protocol) of a format-2 `ca` object `{"method": ..., "hash": <SRI>}`
/// (`src/libstore/content-address.cc` `renderContentAddress`).
fn ca_from_json_object(obj: &serde_json::Value) -> Result<String, String> {
    let method = obj
        .get("method")
        .and_then(|m| m.as_str())
        .ok_or("ca has no method")?;
    let hash_text = obj
        .get("hash")
        .and_then(|h| h.as_str())
        .ok_or("ca has no hash")?;
    let hash =
        Hash::parse_any_prefixed(hash_text).map_err(|e| format!("ca hash {hash_text:?}: {e}"))?;
    let h = hash.to_nix32_prefixed();
    match method {
        "nar" => Ok(format!("fixed:r:{h}")),
        "flat" => Ok(format!("fixed:{h}")),
        "text" => Ok(format!("text:{h}")),
        other => Err(format!("ca method {other:?} is not one Ferry knows")),
    }
}

/// Whether a failed `nix path-info` says so because of the `--json-format` flag: its
/// stderr names the flag. A Nix that refuses plain `--json` (2.34 warns that it is
/// deprecated) asks for `--json-format`; one without the flag (before 2.34) names it when
/// refusing it (`ferry-nix/tests/golden/cli/path-info/*.f1.stderr`). Nix gives no other
/// sign than the text.
pub fn refusal_names_json_format(stderr: &str) -> bool {
    stderr.contains("--json-format")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_golden::{cli_goldens, golden_map, info, read_golden, sd, sp};

    #[test]
    fn references_come_first() {
        let (a, b, c, outside) = (sp('a', "a"), sp('b', "b"), sp('c', "c"), sp('d', "o"));
        let sorted = topo_sort(vec![
            info(&a, &[&b, &c]),
            info(&b, &[&c, &outside]),
            info(&c, &[]),
        ])
        .expect("sorted");
        let names: Vec<&str> = sorted.iter().map(|i| i.path.name()).collect();
        assert_eq!(names, ["c", "b", "a"]);
        let e = topo_sort(vec![info(&a, &[&b]), info(&b, &[&a])]).expect_err("cycle");
        assert!(e.to_string().contains(&a.to_string()), "{e}");
    }

    #[test]
    fn path_info_json_of_nix_2_8() {
        // Printed by Nix 2.8.0 for a file added with `nix-store --add`.
        let text = r#"[{"path":"/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"ca":"fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h","registrationTime":1795325397}]"#;
        let infos = parse_path_info_json(text, &sd()).expect("parse");
        assert_eq!(infos.len(), 1);
        let i = &infos[0];
        assert_eq!(i.path.name(), "f");
        assert_eq!(i.nar_size, 120);
        assert_eq!(
            i.nar_hash.to_base16(),
            "10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6"
        );
        assert!(i.ca.as_deref().is_some_and(|c| c.starts_with("fixed:")));
        assert_eq!(i.deriver, None);
        // Another store directory does not take it.
        let other = StoreDir::new("/gnu/store").expect("dir");
        let e = parse_path_info_json(text, &other).expect_err("not in /gnu/store");
        assert!(e.to_string().contains("/gnu/store"), "{e}");
    }

    /// The same store object as Nix 2.26 and 2.34 print it (`nix path-info --json`, and
    /// 2.34's `--json-format 2`), with an invalid path beside it: every shape gives the same
    /// path info, and the invalid path is reported as such.
    #[test]
    fn path_info_json_of_newer_nix() {
        let a = "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt";
        let v226 = r#"{"/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{"ca":"fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw","deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"registrationTime":1796491372,"signatures":[],"ultimate":false}}"#;
        let v234 = r#"{"/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{"ca":"fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw","deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"registrationTime":1796491363,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":1}}"#;
        let v234f2 = r#"{"info":{"z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{"ca":{"hash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","method":"nar"},"deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"registrationTime":1796491363,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":2}},"storeDir":"/nix/store","version":2}"#;
        let mut seen = Vec::new();
        for text in [v226, v234, v234f2] {
            let infos = parse_path_info_json(text, &sd()).expect("parse");
            assert_eq!(infos.len(), 1, "{text}");
            let i = &infos[0];
            assert_eq!(sd().display(&i.path), a);
            assert_eq!(i.nar_size, 120);
            assert_eq!(
                i.ca.as_deref(),
                Some("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
            );
            assert_eq!(i.deriver, None);
            seen.push(i.clone());
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        // Invalid paths: `null` (keyed forms), as Nix 2.26 and 2.34 print them.
        let x = "/nix/store/00000000000000000000000000000000-x";
        let e = parse_path_info_json(&format!(r#"{{"{x}":null}}"#), &sd()).expect_err("null");
        assert!(
            matches!(&e, PathInfoError::NotValid { path } if path == x),
            "{e}"
        );
        let e = parse_path_info_json(
            r#"{"info":{"00000000000000000000000000000000-x":null},"storeDir":"/nix/store","version":2}"#,
            &sd(),
        )
        .expect_err("null");
        assert!(
            matches!(&e, PathInfoError::NotValid { path } if path == x),
            "{e}"
        );
        // Format 2 references and derivers as base names.
        let f2 = format!(
            r#"{{"info":{{"z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{{"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":["{b}"],"deriver":"{b}.drv","ca":{{"method":"text","hash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="}}}}}},"storeDir":"/nix/store","version":2}}"#,
            b = "00000000000000000000000000000000-x"
        );
        let i = &parse_path_info_json(&f2, &sd()).expect("f2")[0];
        assert_eq!(
            i.references
                .iter()
                .map(|r| sd().display(r))
                .collect::<Vec<_>>(),
            [x]
        );
        assert_eq!(
            i.deriver.as_ref().map(|d| sd().display(d)),
            Some(format!("{x}.drv"))
        );
        assert!(
            i.ca.as_deref()
                .is_some_and(|c| c.starts_with("text:sha256:"))
        );
    }

    #[test]
    fn bad_path_info_is_named() {
        let e = parse_path_info_json("nope", &sd()).expect_err("not json");
        assert!(e.to_string().contains("not its JSON"), "{e}");
        let x = sd().display(&sp('x', "x"));
        let e = parse_path_info_json(&format!(r#"[{{"path":"{x}","valid":false}}]"#), &sd())
            .expect_err("invalid");
        assert!(
            e.to_string().contains(&x) && e.to_string().contains("not valid"),
            "{e}"
        );
        let e = parse_path_info_json(
            &format!(r#"[{{"path":"{x}","narHash":"md7:zz","narSize":1}}]"#),
            &sd(),
        )
        .expect_err("hash");
        assert!(e.to_string().contains("narHash"), "{e}");
    }

    /// Every `nix path-info --json` output the real Nix versions printed parses to the store
    /// objects regen-cli.sh made, with `--json-format 1` and `2` where the version has them;
    /// where it has not, the refusal names the flag, which is what `path_info_json`'s retry
    /// looks for. The NAR hashes agree with `nix-store -q --hash`, what RestoreImporter checks.
    #[test]
    fn real_path_info_json_of_every_version() {
        for (label, dir) in cli_goldens() {
            let paths = golden_map(&dir, "paths.txt");
            let statuses = golden_map(&dir, "statuses.txt");
            let p = |name: &str| {
                let text = paths.get(name).unwrap_or_else(|| panic!("{label}: {name}"));
                sd().parse(text).expect("golden store path")
            };
            let valid: BTreeSet<StorePath> = ["hello", "tree", "flat", "text", "built"]
                .into_iter()
                .map(p)
                .collect();
            let q_hash: Vec<Hash> = read_golden(&dir, "query/hash.out")
                .lines()
                .map(|l| Hash::parse_any_prefixed(l).expect("nix-store -q --hash"))
                .collect();
            for case in ["valid", "closure", "invalid", "drv"] {
                let mut shapes = Vec::new();
                for fmt in ["", ".f1", ".f2"] {
                    let stem = format!("path-info/{case}{fmt}");
                    let what = format!("Nix {label} {stem}");
                    let status = statuses.get(&stem).map(String::as_str);
                    if status != Some("0") {
                        assert!(!fmt.is_empty() && label != "2.34", "{what}: {status:?}");
                        let err = read_golden(&dir, &format!("{stem}.stderr"));
                        assert!(refusal_names_json_format(&err), "{what}: {err}");
                        continue;
                    }
                    let text = read_golden(&dir, &format!("{stem}.json"));
                    let got = parse_path_info_json(&text, &sd());
                    if case == "invalid" {
                        let e = got.expect_err(&what);
                        assert!(
                            matches!(&e, PathInfoError::NotValid { path } if *path == sd().display(&p("missing"))),
                            "{what}: {e}"
                        );
                        continue;
                    }
                    let infos = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let by: BTreeMap<StorePath, PathInfo> =
                        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
                    let names: BTreeSet<StorePath> = by.keys().cloned().collect();
                    match case {
                        "valid" => assert_eq!(names, valid, "{what}"),
                        "closure" => {
                            assert_eq!(names, BTreeSet::from([p("built"), p("hello")]), "{what}")
                        }
                        _ => assert!(
                            names.contains(&p("built-drv")) && names.contains(&p("hello")),
                            "{what}: {names:?}"
                        ),
                    }
                    let hello = &by[&p("hello")];
                    assert_eq!(hello.nar_hash, q_hash[0], "{what}");
                    assert!(
                        hello
                            .ca
                            .as_deref()
                            .is_some_and(|c| c.starts_with("fixed:r:sha256:")),
                        "{what}: {:?}",
                        hello.ca
                    );
                    if let Some(built) = by.get(&p("built")) {
                        assert_eq!(built.nar_hash, q_hash[1], "{what}");
                        assert_eq!(built.deriver, Some(p("built-drv")), "{what}");
                        // `echo $out > $out`: a self-reference besides hello.
                        assert_eq!(
                            built.references,
                            BTreeSet::from([p("built"), p("hello")]),
                            "{what}"
                        );
                        assert_eq!(built.ca, None, "{what}");
                    }
                    if case == "valid" {
                        let ca = |n: &str| by[&p(n)].ca.clone().unwrap_or_default();
                        assert!(ca("flat").starts_with("fixed:sha256:"), "{what}");
                        assert!(ca("tree").starts_with("fixed:r:sha256:"), "{what}");
                        assert!(ca("text").starts_with("text:sha256:"), "{what}");
                        assert_eq!(by[&p("text")].references, BTreeSet::from([p("hello")]));
                    }
                    // registrationTime aside, every format says the same thing.
                    shapes.push(by);
                }
                assert!(
                    shapes.windows(2).all(|w| w[0] == w[1]),
                    "Nix {label} {case}"
                );
            }
        }
    }
}
