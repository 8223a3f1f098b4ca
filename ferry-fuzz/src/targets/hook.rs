//! Targets for the build hook's parsers (`ferry-build-hook`): what the daemon writes to the
//! hook's stdin, the hook's argv and its replies.

use super::{runtime, text};
use std::io;
use std::path::Path;

/// What the daemon writes to the hook's stdin (hook/src/protocol.rs): the settings stream,
/// layered on nix.conf as the hook does (with the `builders` value parsed as machines), then
/// `try` requests, each followed by the inputs and wanted outputs of an accepted job.
pub fn hook_protocol(data: &[u8]) -> bool {
    use ferry_build_hook::protocol::{Request, read_accepted, read_request, read_settings};
    use ferry_nix::wire::AsyncWireReader;
    runtime(async {
        let mut r = AsyncWireReader::new(data);
        let Ok(settings) = read_settings(&mut r).await else {
            return false;
        };
        let mut conf = ferry_nix::nixconf::NixConf::new();
        conf.apply_overrides(&settings);
        if let Some(b) = conf.get("builders") {
            let none = |_: &Path| -> io::Result<Option<String>> { Ok(None) };
            let _ = ferry_nix::machines::parse_machines(b, "builders", "x86_64-linux", &none);
        }
        for _ in 0..16 {
            match read_request(&mut r).await {
                Ok(Request::Try(_)) => {
                    if read_accepted(&mut r).await.is_err() {
                        return true;
                    }
                }
                Ok(Request::Done) | Err(_) => return true,
            }
        }
        true
    })
}

/// The hook's argv (lines or NUL-separated) and what it writes back: a reply is exactly its
/// lines, an `@nix` log line is one line of JSON that gives the text back.
pub fn hook_args_replies(data: &[u8]) -> bool {
    use ferry_build_hook::protocol::{NixLog, Reply, Verbosity, parse_args};
    let t = text(data);
    let argv: Vec<String> = t.split(['\n', '\0']).map(str::to_owned).collect();
    let ok = match parse_args(&argv) {
        Ok(v) => {
            assert!(v.0 <= 7);
            true
        }
        Err(_) => false,
    };
    let accept = Reply::Accept(t.clone().into_owned()).render();
    assert!(accept.starts_with("# accept\n") && accept.ends_with('\n'));
    assert_eq!(accept.matches('\n').count(), 2, "{accept:?}");
    let log = NixLog::Msg {
        level: Verbosity::INFO,
        msg: t.clone().into_owned(),
    }
    .render();
    let json = log
        .strip_prefix("@nix ")
        .and_then(|l| l.strip_suffix('\n'))
        .expect("@nix line");
    assert!(!json.contains('\n'));
    let v: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
    assert_eq!(v["msg"].as_str(), Some(&*t));
    ok
}
