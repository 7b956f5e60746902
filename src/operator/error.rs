//! What can go wrong in a reconcile. Problems a user can fix (a missing
//! Secret) are not errors: they become a `Degraded` condition.

use crate::operator::build::BuildError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("serializing {kind} {name}: {source}")]
    Serialize {
        kind: &'static str,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing the status: {0}")]
    WriteStatus(#[source] kube::Error),
    #[error("building the children: {0}")]
    Build(#[from] BuildError),
    #[error("the system random generator failed")]
    Random,
}

impl Error {
    /// Label of `clusterapp_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Apply { .. } => "apply",
            Error::Serialize { .. } => "serialize",
            Error::WriteStatus(_) => "write_status",
            Error::Build(_) => "build",
            Error::Random => "random",
        }
    }
}
