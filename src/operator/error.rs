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
    /// An apply refused because the namespace is being deleted.
    pub fn is_namespace_terminating(&self) -> bool {
        match self {
            Error::Apply { source: kube::Error::Api(status), .. } => {
                status.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
            }
            _ => false,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(cause: &str) -> Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "configmaps \"x\" is forbidden: unable to create new content in namespace ns because it is being terminated",
            "details": {"name": "x", "kind": "configmaps", "causes": [{"reason": cause, "message": "namespace ns is being terminated", "field": "metadata.namespace"}]}
        }))
        .expect("status");
        Error::Apply { kind: "ConfigMap", name: "x".to_string(), source: kube::Error::Api(Box::new(status)) }
    }

    #[test]
    fn namespace_terminating_is_recognised() {
        assert!(forbidden("NamespaceTerminating").is_namespace_terminating());
        assert!(!forbidden("SomethingElse").is_namespace_terminating());
        assert!(!Error::Random.is_namespace_terminating());
    }
}
