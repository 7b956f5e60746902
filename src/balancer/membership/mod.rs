//! Where the member set comes from: the command line, a file, or the
//! Kubernetes API. Every source hands complete member sets to
//! [`MemberTable::apply`](super::member::MemberTable::apply), which swaps
//! them in atomically — no reload, no dropped request.

pub mod file;
pub mod kubernetes;

use std::path::PathBuf;

use super::member::MemberSpec;

#[derive(Debug, Clone)]
pub enum MembershipSource {
    Static(Vec<MemberSpec>),
    File(PathBuf),
    Kubernetes { namespace: String, service: String, port_name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("reading members file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("parsing members file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("--kubernetes-service must be NAMESPACE/NAME, got {0:?}")]
    BadServiceName(String),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
}

/// Parses `NAMESPACE/NAME`.
pub fn parse_service_ref(s: &str) -> Result<(String, String), MembershipError> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(MembershipError::BadServiceName(s.to_string())),
    }
}
