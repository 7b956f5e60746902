//! Members from a YAML file, re-read when its content changes:
//!
//! ```yaml
//! members:
//!   - route: s1
//!     address: 127.0.0.1:8009
//!     state: ready        # ready | draining | down (default ready)
//! ```
//!
//! The file is polled (every 250 ms) rather than watched with inotify so
//! that it works for ConfigMap mounts, whose symlink swaps inotify misses. A
//! file that does not parse keeps the previous member set and logs why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::MembershipError;
use crate::balancer::config::resolve;
use crate::balancer::member::{MemberSpec, MemberState};
use crate::balancer::state::Balancer;

/// How often the file is compared with what was applied.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersFile {
    #[serde(default)]
    members: Vec<FileMember>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMember {
    route: String,
    /// `HOST:PORT`, resolved when the file is read.
    address: String,
    #[serde(default)]
    state: MemberState,
}

pub fn parse_members(path: &Path, text: &str) -> Result<Vec<MemberSpec>, MembershipError> {
    let parse_error = |message: String| MembershipError::ParseFile { path: path.to_path_buf(), message };
    let file: MembersFile = serde_yaml_ng::from_str(text).map_err(|e| parse_error(e.to_string()))?;
    file.members
        .into_iter()
        .map(|m| {
            if m.route.is_empty() || m.route.contains(['.', ';', ',', ' ']) {
                return Err(parse_error(format!("invalid route {:?}", m.route)));
            }
            let address = resolve(&m.address).map_err(parse_error)?;
            Ok(MemberSpec { route: m.route, address, state: m.state, terminating: false, ready_since: None })
        })
        .collect()
}

pub fn load(path: &Path) -> Result<(String, Vec<MemberSpec>), MembershipError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| MembershipError::ReadFile { path: path.to_path_buf(), source })?;
    let members = parse_members(path, &text)?;
    Ok((text, members))
}

/// Applies the file now and whenever its content changes.
pub async fn watch_file(bal: Arc<Balancer>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let mut applied: Option<String> = None;
    let mut last_error: Option<String> = None;
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                let message = format!("{e}");
                if last_error.as_deref() != Some(&message) {
                    tracing::error!(path = %path.display(), error = %message, "cannot read members file; keeping current members");
                    last_error = Some(message);
                }
                continue;
            }
        };
        if applied.as_deref() == Some(text.as_str()) {
            continue;
        }
        match parse_members(&path, &text) {
            Ok(members) => {
                tracing::info!(path = %path.display(), members = members.len(), "members file applied");
                bal.members.apply(&members, &bal.metrics);
                applied = Some(text);
                last_error = None;
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(&message) {
                    tracing::error!(error = %message, "members file invalid; keeping current members");
                    last_error = Some(message);
                }
                // Do not re-parse the same broken text every tick.
                applied = Some(text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_members() {
        let text = "members:\n  - route: s1\n    address: 127.0.0.1:8009\n  - route: s2\n    address: 127.0.0.1:8010\n    state: draining\n";
        let m = parse_members(Path::new("m.yaml"), text).expect("parse");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].state, MemberState::Ready);
        assert_eq!(m[1].state, MemberState::Draining);
        assert_eq!(m[1].address.port(), 8010);
    }

    #[test]
    fn rejects_bad_files() {
        for bad in [
            "members:\n  - route: s1\n",
            "members:\n  - route: s.1\n    address: 127.0.0.1:1\n",
            "members:\n  - route: s1\n    address: 127.0.0.1:1\n    state: sleepy\n",
            "members:\n  - route: s1\n    address: 127.0.0.1:1\n    weight: 3\n",
            "members: [",
        ] {
            assert!(parse_members(Path::new("m.yaml"), bad).is_err(), "{bad}");
        }
        assert_eq!(parse_members(Path::new("m.yaml"), "members: []").expect("empty").len(), 0);
    }
}
