//! What can go wrong with the local store.

use ferry_nix::derivation::DerivationError;
use ferry_nix::path_info::PathInfoError;
use ferry_nix::store_path::StorePathError;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LocalError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("path info of {path} from `nix path-info --json`: {problem}")]
    BadInfo { path: String, problem: String },
    #[error("`nix path-info --json` printed something that is not its JSON: {0}")]
    BadJson(String),
    /// A tool's output that is not what it prints (not JSON: JSON is [`BadJson`](Self::BadJson)).
    #[error("`{command}` {problem}")]
    BadOutput { command: String, problem: String },
    #[error("{path} is not valid in the local store")]
    NotValid { path: String },
    #[error("{0}")]
    BadPath(#[from] StorePathError),
    #[error("reading the derivation {path}: {source}")]
    Derivation {
        path: String,
        #[source]
        source: Box<DerivationError>,
    },
    #[error("NAR of {path} from the builder has hash {got}, the builder said {want}")]
    NarHashMismatch {
        path: String,
        got: String,
        want: String,
    },
    #[error("reading the NAR of {path}: {source}")]
    NarRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the references of {paths:?} form a cycle")]
    Cycle { paths: Vec<String> },
    #[error("importing {path}: {problem}")]
    Import { path: String, problem: String },
    #[error(
        "{path} was registered with NAR hash {got}, the builder said {want}; the store now \
         holds a wrong copy (repair it with `nix-store --repair-path {path}` or delete it)"
    )]
    RegisteredHashMismatch {
        path: String,
        got: String,
        want: String,
    },
}

impl From<PathInfoError> for LocalError {
    fn from(e: PathInfoError) -> LocalError {
        match e {
            PathInfoError::BadInfo { path, problem } => LocalError::BadInfo { path, problem },
            PathInfoError::BadJson(s) => LocalError::BadJson(s),
            PathInfoError::NotValid { path } => LocalError::NotValid { path },
            PathInfoError::BadPath(e) => LocalError::BadPath(e),
            PathInfoError::Cycle { paths } => LocalError::Cycle { paths },
        }
    }
}
