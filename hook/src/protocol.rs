//! The build-hook protocol adapter (docs/hook-protocol.md §1): argv, the settings stream, `try`
//! requests, the inputs and wanted outputs after an accept, reply lines and `@nix` JSON log
//! lines. Pure: it reads from any `AsyncRead` and renders bytes; nothing here decides which
//! machine builds what, so the rest of the hook can sit behind another entry point later
//! (upstream plans to drop `build-hook`, NixOS/nix#1221; Lix ≥ 2.94 speaks Cap'n Proto).
//!
//! Sources: Nix 2.8 `src/build-remote/build-remote.cc` (the reader side),
//! `src/libstore/build/hook-instance.cc` and `derivation-goal.cc` (the daemon side), HEAD
//! `src/nix/build-remote/build-remote.cc`; `src/libutil/logging.cc` (`JSONLogger`).

use ferry_nix::wire::{AsyncWireReader, Settings, WireError};
use serde::Serialize;
use std::collections::BTreeSet;
use thiserror::Error;
use tokio::io::AsyncRead;

/// Bounds for what the daemon sends. Nix 2.8 sends 91 settings; values such as `builders`
/// may inline a whole machines file, hence the generous string bound.
pub(crate) const MAX_SETTINGS: usize = 4096;
pub(crate) const MAX_SETTING_LEN: u64 = 1 << 20;
/// Store paths are at most a few hundred bytes; a closure may hold many of them.
pub(crate) const MAX_PATH_LEN: u64 = 4096;
pub(crate) const MAX_PATHS: usize = 1 << 20;
pub(crate) const MAX_FEATURES: usize = 1024;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("called without the verbosity argument (argv: {argv:?})")]
    NoVerbosity { argv: Vec<String> },
    #[error("the last argument {arg:?} is not a verbosity level (an integer 0 to 7)")]
    BadVerbosity { arg: String },
    #[error("reading the settings stream: {0}")]
    Settings(#[source] WireError),
    #[error("reading a request from the daemon: {0}")]
    Request(#[source] WireError),
    #[error("reading the inputs and wanted outputs after '# accept': {0}")]
    Accepted(#[source] WireError),
}

/// Nix's `Verbosity` (`src/libutil/logging.hh`): `lvlError = 0` … `lvlVomit = 7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Verbosity(pub u8);

impl Verbosity {
    pub const ERROR: Verbosity = Verbosity(0);
    pub(crate) const WARN: Verbosity = Verbosity(1);
    pub const INFO: Verbosity = Verbosity(3);
    pub(crate) const TALKATIVE: Verbosity = Verbosity(4);
    pub(crate) const CHATTY: Verbosity = Verbosity(5);
}

/// Parses argv. Nix 2.8–2.9 run the hook as `[basename, verbosity]`; 2.10+ as
/// `[basename, extra…, verbosity]` (the `build-hook` setting split on whitespace, then the
/// verbosity appended by `HookInstance::HookInstance`). Either way the verbosity is the last
/// argument; `argv[0]` is never it.
pub fn parse_args(argv: &[String]) -> Result<Verbosity, ProtocolError> {
    let last = match argv {
        [_, .., last] => last,
        _ => {
            return Err(ProtocolError::NoVerbosity {
                argv: argv.to_vec(),
            });
        }
    };
    // Nix writes `std::to_string(verbosity)`; the stock hook reads it with `std::stoll`. Clamp
    // to lvlVomit like a cast would keep it meaningful.
    last.trim()
        .parse::<u64>()
        .map(|v| Verbosity(v.min(7) as u8))
        .map_err(|_| ProtocolError::BadVerbosity { arg: last.clone() })
}

/// Reads the settings stream (docs/hook-protocol.md §1.3).
pub async fn read_settings<R: AsyncRead + Unpin>(
    r: &mut AsyncWireReader<R>,
) -> Result<Settings, ProtocolError> {
    r.read_settings(MAX_SETTINGS, MAX_SETTING_LEN)
        .await
        .map_err(ProtocolError::Settings)
}

/// One `try` message (docs/hook-protocol.md §1.4, `DerivationGoal::tryBuildHook`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// A local build slot is free (always false with `max-jobs = 0`).
    pub(crate) am_willing: bool,
    pub(crate) needed_system: String,
    pub(crate) drv_path: String,
    pub(crate) required_features: BTreeSet<String>,
}

/// What the daemon asks next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Try(TryRequest),
    /// End of input, or a tag other than `try`: the stock hook exits 0 on both.
    Done,
}

/// Reads the next request. End of input at the start of a request is a normal end.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut AsyncWireReader<R>,
) -> Result<Request, ProtocolError> {
    let start = r.offset();
    let tag = match r.read_string(MAX_PATH_LEN).await {
        Ok(tag) => tag,
        Err(WireError::Eof { offset, .. }) if offset == start => return Ok(Request::Done),
        Err(e) => return Err(ProtocolError::Request(e)),
    };
    if tag != "try" {
        return Ok(Request::Done);
    }
    let e = ProtocolError::Request;
    let am_willing = r.read_bool().await.map_err(e)?;
    let needed_system = r.read_string(MAX_PATH_LEN).await.map_err(e)?;
    let drv_path = r.read_string(MAX_PATH_LEN).await.map_err(e)?;
    let required_features = r
        .read_strings(MAX_FEATURES, MAX_PATH_LEN)
        .await
        .map_err(e)?
        .into_iter()
        .collect();
    Ok(Request::Try(TryRequest {
        am_willing,
        needed_system,
        drv_path,
        required_features,
    }))
}

/// What the daemon sends after reading `# accept` and the machine name (2.8
/// `derivation-goal.cc` `tryBuildHook`, HEAD `buildWithHook`), before closing stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedJob {
    /// The input closure (not the `.drv` itself).
    pub(crate) inputs: BTreeSet<String>,
    /// Output names that are not valid yet.
    pub(crate) wanted_outputs: BTreeSet<String>,
}

pub async fn read_accepted<R: AsyncRead + Unpin>(
    r: &mut AsyncWireReader<R>,
) -> Result<AcceptedJob, ProtocolError> {
    let e = ProtocolError::Accepted;
    let inputs = r.read_strings(MAX_PATHS, MAX_PATH_LEN).await.map_err(e)?;
    let wanted = r.read_strings(MAX_PATHS, MAX_PATH_LEN).await.map_err(e)?;
    Ok(AcceptedJob {
        inputs: inputs.into_iter().collect(),
        wanted_outputs: wanted.into_iter().collect(),
    })
}

/// The hook's answer to a `try` (docs/hook-protocol.md §1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Build remotely; the name only appears in the daemon's messages.
    Accept(String),
    /// Build locally (fails the derivation if it cannot be built locally).
    Decline,
    /// Ask again later (after another child finishes, or `build-poll-interval`).
    Postpone,
    /// Never ask this hook again for this Worker: only for "no machines configured".
    DeclinePermanently,
}

impl Reply {
    /// The bytes to write to stderr, in one write: the daemon reads `# accept` and the name
    /// as two lines, and nothing may come between them.
    pub fn render(&self) -> String {
        match self {
            Reply::Accept(name) => {
                // The name is read with `readLine`: a newline inside would end it early.
                let name: String = name.chars().filter(|c| *c != '\n').collect();
                format!("# accept\n{name}\n")
            }
            Reply::Decline => "# decline\n".to_owned(),
            Reply::Postpone => "# postpone\n".to_owned(),
            Reply::DeclinePermanently => "# decline-permanently\n".to_owned(),
        }
    }
}

/// A field of a `start` or `result` message. Nix 2.8 accepts only unsigned integers and
/// strings there (`handleJSONLogMessage` throws on anything else).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Field {
    Int(u64),
    Str(String),
}

/// One `@nix` JSON log message (docs/hook-protocol.md §1.7; 2.8 `JSONLogger`), serialised
/// with its fields in Nix's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum NixLog {
    Msg {
        level: Verbosity,
        msg: String,
    },
    Start {
        id: u64,
        level: Verbosity,
        #[serde(rename = "type")]
        activity: u64,
        text: String,
        fields: Vec<Field>,
    },
    Result {
        id: u64,
        #[serde(rename = "type")]
        result: u64,
        fields: Vec<Field>,
    },
    Stop {
        id: u64,
    },
}

impl NixLog {
    /// `@nix {…}\n`, one line: JSON escapes every control character, so a message with
    /// newlines stays on its line.
    pub fn render(&self) -> String {
        // Serialising plain strings and integers cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("@nix {json}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::wire::WireWriter;

    /// Activity type `actBuild` (`src/libutil/logging.hh` `ActivityType`).
    const ACT_BUILD: u64 = 105;
    /// Result type `resBuildLogLine`.
    const RES_BUILD_LOG_LINE: u64 = 101;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn verbosity_is_the_last_argument_in_both_argv_forms() {
        // Nix 2.8–2.9: `[basename, verbosity]`.
        assert_eq!(
            parse_args(&argv(&["build-remote", "3"])).ok(),
            Some(Verbosity(3))
        );
        // 2.10+: extra words of `build-hook` come first.
        assert_eq!(
            parse_args(&argv(&["nix", "__build-remote", "4"])).ok(),
            Some(Verbosity(4))
        );
        assert_eq!(parse_args(&argv(&["h", "99"])).ok(), Some(Verbosity(7)));
    }

    #[test]
    fn bad_argv_names_the_problem() {
        let e = parse_args(&argv(&["h"])).expect_err("no verbosity");
        assert!(e.to_string().contains("without the verbosity"), "{e}");
        let e = parse_args(&argv(&["h", "loud"])).expect_err("not a number");
        assert!(e.to_string().contains("\"loud\""), "{e}");
    }

    fn encode_try(w: &mut WireWriter<Vec<u8>>, willing: bool, sys: &str, drv: &str, f: &[&str]) {
        w.write_str("try").expect("w");
        w.write_bool(willing).expect("w");
        w.write_str(sys).expect("w");
        w.write_str(drv).expect("w");
        w.write_strings(f.iter().copied()).expect("w");
    }

    #[test]
    fn requests_then_accept_followup_then_eof() {
        let mut w = WireWriter::new(Vec::new());
        w.write_settings(&[("builders", "ssh://a"), ("max-jobs", "0")])
            .expect("w");
        encode_try(
            &mut w,
            false,
            "x86_64-linux",
            "/nix/store/a-x.drv",
            &["kvm"],
        );
        w.write_strings(["/nix/store/b-in"]).expect("w");
        w.write_strings(["out"]).expect("w");
        let bytes = w.into_inner();
        block_on(async {
            let mut r = AsyncWireReader::new(&bytes[..]);
            let s = read_settings(&mut r).await.expect("settings");
            assert_eq!(s[0], ("builders".to_owned(), "ssh://a".to_owned()));
            let Request::Try(t) = read_request(&mut r).await.expect("try") else {
                panic!("not a try")
            };
            assert!(!t.am_willing);
            assert_eq!(t.required_features, BTreeSet::from(["kvm".to_owned()]));
            let job = read_accepted(&mut r).await.expect("accepted");
            assert_eq!(job.wanted_outputs, BTreeSet::from(["out".to_owned()]));
            assert_eq!(read_request(&mut r).await.expect("eof"), Request::Done);
        });
    }

    #[test]
    fn another_tag_ends_and_a_cut_request_names_its_offset() {
        let mut w = WireWriter::new(Vec::new());
        w.write_str("quit").expect("w");
        let bytes = w.into_inner();
        block_on(async {
            let mut r = AsyncWireReader::new(&bytes[..]);
            assert_eq!(read_request(&mut r).await.expect("other"), Request::Done);
        });
        let mut w = WireWriter::new(Vec::new());
        w.write_str("try").expect("w");
        w.write_bool(true).expect("w");
        let bytes = w.into_inner();
        block_on(async {
            let mut r = AsyncWireReader::new(&bytes[..]);
            let e = read_request(&mut r).await.expect_err("cut");
            assert!(e.to_string().contains("byte offset 24"), "{e}");
        });
        let bytes = 5u64.to_le_bytes();
        block_on(async {
            let mut r = AsyncWireReader::new(&bytes[..]);
            let e = read_request(&mut r).await.expect_err("bad am-willing");
            assert!(e.to_string().contains("reading a request"), "{e}");
        });
    }

    #[test]
    fn accept_followup_errors_say_where() {
        let bytes = 1u64.to_le_bytes();
        block_on(async {
            let mut r = AsyncWireReader::new(&bytes[..]);
            let e = read_accepted(&mut r).await.expect_err("cut");
            assert!(e.to_string().contains("after '# accept'"), "{e}");
        });
    }

    #[test]
    fn replies_render_as_the_daemon_reads_them() {
        assert_eq!(
            Reply::Accept("ssh://root@h".into()).render(),
            "# accept\nssh://root@h\n"
        );
        assert_eq!(Reply::Accept("a\nb".into()).render(), "# accept\nab\n");
        assert_eq!(Reply::Decline.render(), "# decline\n");
        assert_eq!(Reply::Postpone.render(), "# postpone\n");
        assert_eq!(
            Reply::DeclinePermanently.render(),
            "# decline-permanently\n"
        );
    }

    #[test]
    fn log_lines_are_one_line_of_well_formed_json() {
        let m = NixLog::Msg {
            level: Verbosity::ERROR,
            msg: "a \"q\"\nb\\\u{1}".into(),
        }
        .render();
        assert_eq!(
            m,
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"a \\\"q\\\"\\nb\\\\\\u0001\"}\n"
        );
        let s = NixLog::Start {
            id: 7,
            level: Verbosity::INFO,
            activity: ACT_BUILD,
            text: "building".into(),
            fields: vec![Field::Str("/nix/store/x.drv".into()), Field::Int(1)],
        }
        .render();
        assert_eq!(
            s,
            "@nix {\"action\":\"start\",\"id\":7,\"level\":3,\"type\":105,\"text\":\"building\",\
             \"fields\":[\"/nix/store/x.drv\",1]}\n"
        );
        let r = NixLog::Result {
            id: 7,
            result: RES_BUILD_LOG_LINE,
            fields: vec![Field::Str("line".into())],
        }
        .render();
        assert_eq!(
            r,
            "@nix {\"action\":\"result\",\"id\":7,\"type\":101,\"fields\":[\"line\"]}\n"
        );
        assert_eq!(
            NixLog::Stop { id: 7 }.render(),
            "@nix {\"action\":\"stop\",\"id\":7}\n"
        );
    }

    fn golden(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ferry-nix/tests/golden/wire")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The bytes real Nix 2.8.0 sent a hook (ferry-nix/tests/golden/wire/hook-stdin.bin, made
    /// by regen-wire.sh): 91 settings, then one `try`, then the daemon closed stdin after the
    /// hook declined.
    #[test]
    fn real_nix_2_8_hook_stdin() {
        let bytes = golden("hook-stdin.bin");
        let expected = String::from_utf8(golden("hook-expected.txt")).expect("utf-8");
        let want = |k: &str| {
            expected
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ').map(str::to_owned))
                .unwrap_or_else(|| panic!("{k}"))
        };
        block_on(async {
            let mut r = AsyncWireReader::new(&bytes[..]);
            let settings = read_settings(&mut r).await.expect("settings");
            assert_eq!(settings.len(), 91);
            let get = |k: &str| {
                settings
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(get("builders"), Some(want("builders")));
            assert_eq!(get("system-features"), Some(want("system-features")));
            let Request::Try(t) = read_request(&mut r).await.expect("try") else {
                panic!("no try")
            };
            assert_eq!(t.drv_path, want("drv"));
            assert_eq!(t.needed_system, want("system"));
            assert!(t.am_willing);
            assert_eq!(
                t.required_features,
                BTreeSet::from(["ferry-wire".to_owned()])
            );
            assert_eq!(read_request(&mut r).await.expect("end"), Request::Done);
        });
    }
    /// The settings stream and `try` of each Nix version in `integration/nix-versions`: the
    /// wire/ goldens (build-hook set with `--option`, regen-wire.sh) and the cli/ ones
    /// (regen-cli.sh: set in NIX_CONFIG, in nix.conf, with `--option`; Nix 2.26 never ran
    /// the one from nix.conf). The argv each hook got parses to its verbosity.
    #[test]
    fn real_hook_stdin_of_every_version() {
        let golden =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferry-nix/tests/golden");
        for (label, sub) in [("2.8", ""), ("2.26", "nix-2.26"), ("2.34", "nix-2.34")] {
            let wire = golden.join("wire").join(sub);
            let cli = golden.join("cli").join(sub);
            let read = |p: std::path::PathBuf| {
                std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            };
            let expected = String::from_utf8(read(wire.join("hook-expected.txt"))).expect("utf-8");
            let want = |k: &str| {
                expected
                    .lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ').map(str::to_owned))
                    .unwrap_or_else(|| panic!("{k}"))
            };
            assert!(
                want("nix-version").contains(&format!(" {label}.")),
                "{label}"
            );
            let called = String::from_utf8(read(cli.join("hook/called.txt"))).expect("utf-8");
            let mut streams = vec![(
                read(wire.join("hook-stdin.bin")),
                want("builders"),
                want("drv"),
                "ferry-wire",
                want("build-hook"),
            )];
            for line in called.lines() {
                let Some((how, outcome)) = line.split_once(' ') else {
                    panic!("{line}")
                };
                if outcome != "called" {
                    assert_eq!((label, how), ("2.26", "nix-conf"), "{line}");
                    continue;
                }
                let argv: Vec<String> =
                    String::from_utf8(read(cli.join(format!("hook/{how}.argv"))))
                        .expect("utf-8")
                        .lines()
                        .map(str::to_owned)
                        .collect();
                assert_eq!(
                    parse_args(&argv).expect("argv"),
                    Verbosity::INFO,
                    "{label} {how}"
                );
                let stdin = read(cli.join(format!("hook/{how}.stdin")));
                let hook = argv[0].clone();
                streams.push((
                    stdin,
                    "ssh://ferry-cli-nowhere".into(),
                    String::new(),
                    "ferry-cli",
                    hook,
                ));
            }
            assert!(streams.len() >= 3, "Nix {label}");
            for (bytes, builders, drv, feature, hook) in streams {
                block_on(async {
                    let mut r = AsyncWireReader::new(&bytes[..]);
                    let settings = read_settings(&mut r).await.expect("settings");
                    let get = |k: &str| {
                        settings
                            .iter()
                            .find(|(n, _)| n == k)
                            .map(|(_, v)| v.clone())
                    };
                    assert_eq!(get("builders"), Some(builders), "Nix {label}");
                    assert_eq!(
                        get("system-features"),
                        Some(feature.to_owned()),
                        "Nix {label}"
                    );
                    assert_eq!(get("build-hook"), Some(hook), "Nix {label}");
                    let Request::Try(t) = read_request(&mut r).await.expect("try") else {
                        panic!("no try")
                    };
                    if !drv.is_empty() {
                        assert_eq!(t.drv_path, drv, "Nix {label}");
                    }
                    assert!(t.drv_path.ends_with(".drv"), "Nix {label}");
                    assert_eq!(t.needed_system, "x86_64-linux");
                    assert!(t.am_willing, "max-jobs 1: a local slot is free");
                    assert_eq!(t.required_features, BTreeSet::from([feature.to_owned()]));
                    assert_eq!(read_request(&mut r).await.expect("end"), Request::Done);
                });
            }
        }
    }
}
