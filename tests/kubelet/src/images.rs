//! Image → local program mapping (tests/kubelet/images.yaml).
//!
//! Nothing is pulled: an image names one of a few local programs. Matching is
//! by repository only (the tag and digest are ignored), so a rolling update
//! that changes the tag still runs the same program.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Debian's Tomcat 10.1 laid out like the official `tomcat:10.1` image.
    Tomcat,
    /// The `clusterapp` binary built from this repository.
    Clusterapp,
    /// The container's command, run as given.
    Exec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageEntry {
    pub repository: String,
    pub kind: ImageKind,
    /// The image's ENTRYPOINT (replaced by the container's `command`).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The image's CMD (replaced by the container's `args`).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// The image's ENV (the container's `env` wins).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Web applications in the image's webapps/ folder (tomcat kind):
    /// context name → script that builds the exploded WAR into its argument.
    #[serde(default)]
    pub webapps: BTreeMap<String, WebappSource>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WebappSource {
    /// Relative to the mapping file's folder.
    pub build: PathBuf,
}

#[derive(Debug, Deserialize)]
struct ImagesFile {
    images: Vec<ImageEntry>,
}

#[derive(Debug)]
pub struct Images {
    entries: Vec<ImageEntry>,
    /// The mapping file's folder, for relative build scripts.
    pub base_dir: PathBuf,
}

impl Images {
    pub fn load(path: &Path) -> anyhow::Result<Images> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the image map {}", path.display()))?;
        let file: ImagesFile =
            serde_yaml_ng::from_str(&text).with_context(|| format!("parsing the image map {}", path.display()))?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Ok(Images { entries: file.images, base_dir: std::fs::canonicalize(&base_dir).unwrap_or(base_dir) })
    }

    pub fn lookup(&self, image: &str) -> Option<&ImageEntry> {
        let wanted = normalize_repository(repository_of(image));
        self.entries.iter().find(|e| normalize_repository(&e.repository) == wanted)
    }

    pub fn webapp_sources(&self) -> impl Iterator<Item = (&String, &WebappSource)> {
        self.entries.iter().flat_map(|e| e.webapps.iter())
    }
}

/// `registry:5000/team/app:1.2@sha256:…` → `registry:5000/team/app`.
pub fn repository_of(image: &str) -> &str {
    let without_digest = image.split_once('@').map_or(image, |(repo, _)| repo);
    match without_digest.rfind(':') {
        // A ':' after the last '/' separates the tag; before it, a registry port.
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}

/// Docker Hub spellings of the same repository compare equal:
/// `docker.io/library/tomcat` = `library/tomcat` = `tomcat`.
fn normalize_repository(repository: &str) -> String {
    let r = repository
        .strip_prefix("docker.io/")
        .or_else(|| repository.strip_prefix("index.docker.io/"))
        .unwrap_or(repository);
    r.strip_prefix("library/").unwrap_or(r).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_ignores_tag_and_digest_but_not_registry_port() {
        assert_eq!(repository_of("tomcat:10.1"), "tomcat");
        assert_eq!(repository_of("ghcr.io/clusterapp/counter-app:v2"), "ghcr.io/clusterapp/counter-app");
        assert_eq!(repository_of("localhost:5000/app"), "localhost:5000/app");
        assert_eq!(repository_of("localhost:5000/app:1@sha256:abc"), "localhost:5000/app");
        assert_eq!(normalize_repository("docker.io/library/tomcat"), "tomcat");
    }
}
