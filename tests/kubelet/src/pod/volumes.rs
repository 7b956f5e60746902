//! Pod volumes, materialised as folders under `<pod dir>/volumes/<name>` and
//! bind-mounted into the containers by `enter`.
//!
//! Not emulated: persistentVolumeClaim, ephemeral, CSI and image volumes (the
//! Pod stays in ContainerCreating with a message); emptyDir `medium: Memory`
//! is a plain folder; hostPath only for paths that exist.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, ServiceAccount, Volume};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use super::env::{ApiObjects, PodFacts, field_value, resource_value};

/// A file a volume gets from a ConfigMap or Secret: content and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub content: Vec<u8>,
    pub mode: Option<i32>,
}

/// The files of one volume that come from ConfigMaps and Secrets (also
/// projected sources), kept current while the Pod runs, as a kubelet does.
#[derive(Debug, Clone)]
pub struct SyncedVolume {
    pub name: String,
    pub dir: PathBuf,
    /// Relative path → what was last written there.
    pub files: BTreeMap<String, KeyFile>,
}

/// A projected ServiceAccount token file we keep fresh.
#[derive(Debug, Clone)]
pub struct TokenFile {
    pub path: PathBuf,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
    pub refresh_at: Instant,
}

#[derive(Debug, Default)]
pub struct Volumes {
    /// Volume name → folder (or, for hostPath, the host path).
    pub paths: HashMap<String, PathBuf>,
    pub tokens: Vec<TokenFile>,
    pub fs_group: Option<u32>,
    /// ConfigMap/Secret-backed volumes, re-read by [`resync`].
    pub synced: Vec<SyncedVolume>,
    /// When [`resync`] is due next.
    pub next_resync: Option<Instant>,
}

/// Refuses paths that would escape the volume folder.
fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if p.components().all(|c| matches!(c, Component::Normal(_))) && !path.is_empty() {
        Ok(p.to_path_buf())
    } else {
        Err(format!("invalid volume item path {path:?}"))
    }
}

fn write_file(dir: &Path, rel: &str, content: &[u8], mode: Option<i32>) -> Result<(), String> {
    let path = dir.join(safe_relative(rel)?);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    // Write then rename, so a process reading a refreshed file never sees half of it.
    let tmp = path.with_extension("kubelet-tmp");
    std::fs::write(&tmp, content).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let mode = mode.map(|m| m as u32 & 0o777).unwrap_or(0o644);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming into {}: {e}", path.display()))
}

/// The files a ConfigMap's or Secret's keys become (all, or the listed items).
fn key_files(
    keys: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
    out: &mut BTreeMap<String, KeyFile>,
) -> Result<(), String> {
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let value = keys.get(&item.key).ok_or_else(|| format!("{what}: no key {:?}", item.key))?;
                safe_relative(&item.path)?;
                out.insert(item.path.clone(), KeyFile { content: value.clone(), mode: item.mode.or(default_mode) });
            }
        }
        _ => {
            for (key, value) in keys {
                safe_relative(key)?;
                out.insert(key.clone(), KeyFile { content: value.clone(), mode: default_mode });
            }
        }
    }
    Ok(())
}

/// What the ConfigMap and Secret sources of `volume` hold now (read from the
/// API through `objects`); None for volumes without such sources. A missing
/// optional object contributes nothing; a missing required one is an error.
async fn desired_key_files(
    objects: &mut ApiObjects,
    volume: &Volume,
) -> Result<Option<BTreeMap<String, KeyFile>>, String> {
    let mut out = BTreeMap::new();
    if let Some(cm) = &volume.config_map {
        match objects.configmap(&cm.name).await? {
            Some(keys) => {
                key_files(&keys, cm.items.as_ref(), cm.default_mode, &format!("configmap {:?}", cm.name), &mut out)?
            }
            None if cm.optional.unwrap_or(false) => {}
            None => return Err(format!("configmap {:?} not found", cm.name)),
        }
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        match objects.secret(&name).await? {
            Some(keys) => {
                key_files(&keys, secret.items.as_ref(), secret.default_mode, &format!("secret {name:?}"), &mut out)?
            }
            None if secret.optional.unwrap_or(false) => {}
            None => return Err(format!("secret {name:?} not found")),
        }
    } else if let Some(projected) = &volume.projected {
        let mode = projected.default_mode;
        let mut any = false;
        for source in projected.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                any = true;
                match objects.configmap(&cm.name).await? {
                    Some(keys) => {
                        key_files(&keys, cm.items.as_ref(), mode, &format!("configmap {:?}", cm.name), &mut out)?
                    }
                    None if cm.optional.unwrap_or(false) => {}
                    None => return Err(format!("configmap {:?} not found", cm.name)),
                }
            } else if let Some(secret) = &source.secret {
                any = true;
                match objects.secret(&secret.name).await? {
                    Some(keys) => {
                        key_files(&keys, secret.items.as_ref(), mode, &format!("secret {:?}", secret.name), &mut out)?
                    }
                    None if secret.optional.unwrap_or(false) => {}
                    None => return Err(format!("secret {:?} not found", secret.name)),
                }
            }
        }
        if !any {
            return Ok(None);
        }
    } else {
        return Ok(None);
    }
    Ok(Some(out))
}

/// Brings the ConfigMap/Secret files of `volume` to `desired`: writes (write
/// and rename) only the files whose content or mode differs from what was
/// last written, removes those no longer wanted. A file rewritten with the
/// same bytes would wake every program that watches it (the balancer
/// reloads its certificate on a changed mtime), so unchanged files are left
/// alone. Returns the paths written or removed.
pub fn sync_key_files(
    volume: &mut SyncedVolume,
    desired: BTreeMap<String, KeyFile>,
    fs_group: Option<u32>,
) -> Result<Vec<String>, String> {
    let mut changed = Vec::new();
    for (rel, file) in &desired {
        if volume.files.get(rel) == Some(file) {
            continue;
        }
        write_file(&volume.dir, rel, &file.content, file.mode)?;
        if let Some(gid) = fs_group {
            let path = volume.dir.join(safe_relative(rel)?);
            apply_fs_group(&path, gid).map_err(|e| format!("applying fsGroup to {}: {e}", path.display()))?;
        }
        changed.push(rel.clone());
    }
    for rel in volume.files.keys().filter(|rel| !desired.contains_key(*rel)) {
        let path = volume.dir.join(safe_relative(rel)?);
        match std::fs::remove_file(&path) {
            Ok(()) => changed.push(rel.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", path.display())),
        }
    }
    volume.files = desired;
    Ok(changed)
}

fn write_downward(
    dir: &Path,
    facts: &PodFacts<'_>,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    node: (&str, &str),
) -> Result<(), String> {
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            field_value(facts, &f.field_path)?
        } else if let Some(r) = &item.resource_field_ref {
            let spec = facts.pod.spec.as_ref().ok_or("pod without spec")?;
            let container = spec
                .containers
                .iter()
                .find(|c| Some(&c.name) == r.container_name.as_ref())
                .or_else(|| spec.containers.first())
                .ok_or("pod without containers")?;
            resource_value(container, &r.resource, r.divisor.as_ref(), node.0, node.1)?
        } else {
            continue;
        };
        write_file(dir, &item.path, value.as_bytes(), item.mode.or(default_mode))?;
    }
    Ok(())
}

/// Requests a token for the Pod's ServiceAccount bound to the Pod (the node
/// identity may only request tokens bound to its own Pods).
pub async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: i64,
) -> Result<(String, i64), String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa_name = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let mut spec = serde_json::json!({
        "expirationSeconds": expiration_seconds,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid},
    });
    if let Some(a) = audience {
        spec["audiences"] = serde_json::json!([a]);
    }
    let request: TokenRequest = serde_json::from_value(
        serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
    )
    .map_err(|e| format!("building the token request: {e}"))?;
    let response = api
        .create_token_request(&sa_name, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for serviceaccount {sa_name:?}: {e}"))?;
    let status = response.status.ok_or("token request without status")?;
    let token = status.token.ok_or("token request answered without a token")?;
    let lifetime = status
        .expiration_timestamp
        .map_or(expiration_seconds, |t| t.0.as_second() - k8s_openapi::jiff::Timestamp::now().as_second());
    Ok((token, lifetime.max(60)))
}

/// When to refresh a token: at 80 % of its lifetime, as the kubelet does.
fn refresh_instant(lifetime_seconds: i64) -> Instant {
    Instant::now() + Duration::from_secs((lifetime_seconds.max(10) as u64) * 4 / 5)
}

pub async fn materialize(
    client: &Client,
    objects: &mut ApiObjects,
    facts: &PodFacts<'_>,
    pod_dir: &Path,
    node: (&str, &str),
    fs_group: Option<u32>,
) -> Result<Volumes, String> {
    let mut volumes = Volumes::default();
    let spec = facts.pod.spec.as_ref().ok_or("pod without spec")?;
    let root = pod_dir.join("volumes");
    for volume in spec.volumes.iter().flatten() {
        let dir = root.join(&volume.name);
        // Start from scratch each time (a retry after a missing ConfigMap, say).
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        materialize_one(client, facts, volume, &dir, node, &mut volumes).await?;
        if let Some(desired) = desired_key_files(objects, volume).await? {
            let mut synced = SyncedVolume { name: volume.name.clone(), dir: dir.clone(), files: BTreeMap::new() };
            sync_key_files(&mut synced, desired, None)?;
            volumes.synced.push(synced);
        }
        if !volumes.paths.contains_key(&volume.name) {
            if let Some(gid) = fs_group {
                apply_fs_group(&dir, gid)
                    .map_err(|e| format!("volume {:?}: applying fsGroup {gid}: {e}", volume.name))?;
            }
            volumes.paths.insert(volume.name.clone(), dir);
        }
    }
    volumes.fs_group = fs_group;
    Ok(volumes)
}

/// fsGroup as a kubelet applies it: the group owns the volume's files and
/// may read them (and write where the owner may), folders get setgid.
fn apply_fs_group(path: &Path, gid: u32) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, None, Some(gid))?;
    let mode = meta.permissions().mode() & 0o7777;
    let owner_bits = (mode & 0o700) >> 3;
    if meta.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | owner_bits | 0o2050))?;
        for entry in std::fs::read_dir(path)? {
            apply_fs_group(&entry?.path(), gid)?;
        }
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | owner_bits | 0o040))?;
    }
    Ok(())
}

async fn materialize_one(
    client: &Client,
    facts: &PodFacts<'_>,
    volume: &Volume,
    dir: &Path,
    node: (&str, &str),
    volumes: &mut Volumes,
) -> Result<(), String> {
    if volume.empty_dir.is_some() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(|e| e.to_string())?;
    } else if volume.config_map.is_some() || volume.secret.is_some() {
        // Written by sync_key_files (materialize), and kept current by resync.
    } else if let Some(downward) = &volume.downward_api {
        write_downward(dir, facts, downward.items.as_deref().unwrap_or_default(), downward.default_mode, node)?;
    } else if let Some(projected) = &volume.projected {
        let mode = projected.default_mode;
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let expiration = token.expiration_seconds.unwrap_or(3600).max(600);
                let (value, lifetime) = request_token(client, facts.pod, token.audience.as_deref(), expiration).await?;
                // No trailing newline: Tomcat's membership puts the file into a header as is.
                write_file(dir, &token.path, value.as_bytes(), mode.or(Some(0o644)))?;
                volumes.tokens.push(TokenFile {
                    path: dir.join(safe_relative(&token.path)?),
                    audience: token.audience.clone(),
                    expiration_seconds: expiration,
                    refresh_at: refresh_instant(lifetime),
                });
            } else if source.config_map.is_some() || source.secret.is_some() {
                // Written by sync_key_files (materialize), and kept current by resync.
            } else if let Some(downward) = &source.downward_api {
                write_downward(dir, facts, downward.items.as_deref().unwrap_or_default(), mode, node)?;
            } else {
                return Err(format!(
                    "volume {:?}: projected source kind not emulated by the process kubelet",
                    volume.name
                ));
            }
        }
    } else if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        if !path.exists() {
            return Err(format!("hostPath {:?} does not exist (the process kubelet creates none)", host.path));
        }
        volumes.paths.insert(volume.name.clone(), path);
    } else {
        return Err(format!("volume {:?}: this volume type is not emulated by the process kubelet", volume.name));
    }
    Ok(())
}

/// Re-requests tokens whose refresh time has come; returns how many.
pub async fn refresh_tokens(client: &Client, pod: &Pod, volumes: &mut Volumes) -> Result<usize, String> {
    let mut refreshed = 0;
    for token in volumes.tokens.iter_mut().filter(|t| t.refresh_at <= Instant::now()) {
        let (value, lifetime) = request_token(client, pod, token.audience.as_deref(), token.expiration_seconds).await?;
        let dir = token.path.parent().ok_or("token path without folder")?;
        let name = token.path.file_name().and_then(|n| n.to_str()).ok_or("token path without name")?;
        write_file(dir, name, value.as_bytes(), Some(0o644))?;
        if let Some(gid) = volumes.fs_group {
            apply_fs_group(&token.path, gid)
                .map_err(|e| format!("applying fsGroup to {}: {e}", token.path.display()))?;
        }
        token.refresh_at = refresh_instant(lifetime);
        refreshed += 1;
        info!(path = %token.path.display(), "refreshed a ServiceAccount token");
    }
    Ok(refreshed)
}

/// Re-reads the ConfigMaps and Secrets behind the Pod's volumes (fresh from
/// the API, no cache across calls) and updates the files that changed, as a
/// kubelet's periodic volume sync does. An object that cannot be read (gone,
/// API error) leaves that volume as it is. Returns the files changed.
pub async fn resync(client: &Client, pod: &Pod, volumes: &mut Volumes) -> Result<usize, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut objects = ApiObjects::new(client, namespace);
    let spec = pod.spec.as_ref().ok_or("pod without spec")?;
    let mut changed = 0;
    let mut problems = Vec::new();
    for synced in volumes.synced.iter_mut() {
        let Some(volume) = spec.volumes.iter().flatten().find(|v| v.name == synced.name) else { continue };
        let desired = match desired_key_files(&mut objects, volume).await {
            Ok(Some(desired)) => desired,
            Ok(None) => continue,
            Err(e) => {
                problems.push(format!("volume {:?}: {e}", synced.name));
                continue;
            }
        };
        let paths =
            sync_key_files(synced, desired, volumes.fs_group).map_err(|e| format!("volume {:?}: {e}", synced.name))?;
        if !paths.is_empty() {
            info!(volume = synced.name, files = ?paths, "updated volume files from a changed ConfigMap/Secret");
            changed += paths.len();
        }
    }
    if problems.is_empty() { Ok(changed) } else { Err(problems.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clusterapp-kubelet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, KeyFile> {
        pairs.iter().map(|(k, v)| (k.to_string(), KeyFile { content: v.as_bytes().to_vec(), mode: None })).collect()
    }

    /// (inode, mtime in ns): a rename-rewrite always gets a new inode.
    fn identity(path: &Path) -> (u64, i128) {
        let meta = std::fs::metadata(path).expect("metadata");
        (meta.ino(), meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128)
    }

    #[test]
    fn sync_writes_only_what_changed_and_removes_dropped_keys() {
        let dir = temp_dir("sync");
        let mut volume = SyncedVolume { name: "tls".into(), dir: dir.clone(), files: BTreeMap::new() };

        let written = sync_key_files(
            &mut volume,
            files(&[("tls.crt", "cert 1"), ("tls.key", "key 1"), ("sub/extra", "x")]),
            None,
        )
        .expect("first sync");
        assert_eq!(written, ["sub/extra", "tls.crt", "tls.key"]);
        assert_eq!(std::fs::read_to_string(dir.join("tls.crt")).unwrap(), "cert 1");
        assert_eq!(std::fs::read_to_string(dir.join("sub/extra")).unwrap(), "x");
        let (crt, key) = (identity(&dir.join("tls.crt")), identity(&dir.join("tls.key")));

        // The same content again: nothing is touched.
        let written = sync_key_files(
            &mut volume,
            files(&[("tls.crt", "cert 1"), ("tls.key", "key 1"), ("sub/extra", "x")]),
            None,
        )
        .expect("same");
        assert!(written.is_empty(), "{written:?}");
        assert_eq!(identity(&dir.join("tls.crt")), crt);
        assert_eq!(identity(&dir.join("tls.key")), key);

        // One key changes, one goes: only those files change.
        let written =
            sync_key_files(&mut volume, files(&[("tls.crt", "cert 2"), ("tls.key", "key 1")]), None).expect("changed");
        assert_eq!(written, ["tls.crt", "sub/extra"]);
        assert_eq!(std::fs::read_to_string(dir.join("tls.crt")).unwrap(), "cert 2");
        assert_ne!(identity(&dir.join("tls.crt")), crt);
        assert_eq!(identity(&dir.join("tls.key")), key);
        assert!(!dir.join("sub/extra").exists());
        assert!(!dir.join("tls.kubelet-tmp").exists(), "no temporary file left");

        // A changed mode alone rewrites the file with the new mode.
        let mut desired = files(&[("tls.crt", "cert 2"), ("tls.key", "key 1")]);
        desired.get_mut("tls.key").unwrap().mode = Some(0o600);
        let written = sync_key_files(&mut volume, desired, None).expect("mode");
        assert_eq!(written, ["tls.key"]);
        assert_eq!(std::fs::metadata(dir.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_files_follow_items_and_refuse_escaping_paths() {
        let keys: BTreeMap<String, Vec<u8>> =
            [("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())].into();
        let mut out = BTreeMap::new();
        key_files(&keys, None, Some(0o400), "secret", &mut out).expect("all keys");
        assert_eq!(out.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(out["a"].mode, Some(0o400));
        let items =
            vec![KeyToPath { key: "b".into(), path: "dir/bee".into(), mode: Some(0o640), ..Default::default() }];
        let mut out = BTreeMap::new();
        key_files(&keys, Some(&items), Some(0o400), "secret", &mut out).expect("items");
        assert_eq!(out.keys().collect::<Vec<_>>(), ["dir/bee"]);
        assert_eq!(out["dir/bee"], KeyFile { content: b"2".to_vec(), mode: Some(0o640) });
        let bad = vec![KeyToPath { key: "a".into(), path: "../escape".into(), ..Default::default() }];
        assert!(key_files(&keys, Some(&bad), None, "secret", &mut BTreeMap::new()).is_err());
        let missing = vec![KeyToPath { key: "zzz".into(), path: "z".into(), ..Default::default() }];
        assert!(key_files(&keys, Some(&missing), None, "secret", &mut BTreeMap::new()).is_err());
    }
}
