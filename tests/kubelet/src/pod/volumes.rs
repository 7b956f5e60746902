//! Pod volumes, materialised as folders under `<pod dir>/volumes/<name>` and
//! bind-mounted into the containers by `enter`.
//!
//! Not emulated: persistentVolumeClaim, ephemeral, CSI and image volumes (the
//! Pod stays in ContainerCreating with a message); emptyDir `medium: Memory`
//! is a plain folder; hostPath only for paths that exist.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, ServiceAccount, Volume};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use super::env::{ApiObjects, PodFacts, field_value, resource_value};

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
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| format!("chmod {}: {e}", path.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming into {}: {e}", path.display()))
}

/// Writes a ConfigMap's or Secret's keys (all, or the listed items).
fn write_keys(
    dir: &Path,
    keys: &std::collections::BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
) -> Result<(), String> {
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let value = keys.get(&item.key).ok_or_else(|| format!("{what}: no key {:?}", item.key))?;
                write_file(dir, &item.path, value, item.mode.or(default_mode))?;
            }
        }
        _ => {
            for (key, value) in keys {
                write_file(dir, key, value, default_mode)?;
            }
        }
    }
    Ok(())
}

fn write_downward(dir: &Path, facts: &PodFacts<'_>, items: &[DownwardAPIVolumeFile], default_mode: Option<i32>, node: (&str, &str)) -> Result<(), String> {
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
pub async fn request_token(client: &Client, pod: &Pod, audience: Option<&str>, expiration_seconds: i64) -> Result<(String, i64), String> {
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
    let request: TokenRequest = serde_json::from_value(serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}))
        .map_err(|e| format!("building the token request: {e}"))?;
    let response = api
        .create_token_request(&sa_name, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for serviceaccount {sa_name:?}: {e}"))?;
    let status = response.status.ok_or("token request without status")?;
    let token = status.token.ok_or("token request answered without a token")?;
    let lifetime = status.expiration_timestamp.map_or(expiration_seconds, |t| t.0.as_second() - k8s_openapi::jiff::Timestamp::now().as_second());
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
        materialize_one(client, objects, facts, volume, &dir, node, &mut volumes).await?;
        if !volumes.paths.contains_key(&volume.name) {
            if let Some(gid) = fs_group {
                apply_fs_group(&dir, gid).map_err(|e| format!("volume {:?}: applying fsGroup {gid}: {e}", volume.name))?;
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
    objects: &mut ApiObjects,
    facts: &PodFacts<'_>,
    volume: &Volume,
    dir: &Path,
    node: (&str, &str),
    volumes: &mut Volumes,
) -> Result<(), String> {
    if volume.empty_dir.is_some() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(|e| e.to_string())?;
    } else if let Some(cm) = &volume.config_map {
        match objects.configmap(&cm.name).await? {
            Some(keys) => write_keys(dir, &keys, cm.items.as_ref(), cm.default_mode, &format!("configmap {:?}", cm.name))?,
            None if cm.optional.unwrap_or(false) => {}
            None => return Err(format!("configmap {:?} not found", cm.name)),
        }
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        match objects.secret(&name).await? {
            Some(keys) => write_keys(dir, &keys, secret.items.as_ref(), secret.default_mode, &format!("secret {name:?}"))?,
            None if secret.optional.unwrap_or(false) => {}
            None => return Err(format!("secret {name:?} not found")),
        }
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
            } else if let Some(cm) = &source.config_map {
                match objects.configmap(&cm.name).await? {
                    Some(keys) => write_keys(dir, &keys, cm.items.as_ref(), mode, &format!("configmap {:?}", cm.name))?,
                    None if cm.optional.unwrap_or(false) => {}
                    None => return Err(format!("configmap {:?} not found", cm.name)),
                }
            } else if let Some(secret) = &source.secret {
                match objects.secret(&secret.name).await? {
                    Some(keys) => write_keys(dir, &keys, secret.items.as_ref(), mode, &format!("secret {:?}", secret.name))?,
                    None if secret.optional.unwrap_or(false) => {}
                    None => return Err(format!("secret {:?} not found", secret.name)),
                }
            } else if let Some(downward) = &source.downward_api {
                write_downward(dir, facts, downward.items.as_deref().unwrap_or_default(), mode, node)?;
            } else {
                return Err(format!("volume {:?}: projected source kind not emulated by the process kubelet", volume.name));
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
            apply_fs_group(&token.path, gid).map_err(|e| format!("applying fsGroup to {}: {e}", token.path.display()))?;
        }
        token.refresh_at = refresh_instant(lifetime);
        refreshed += 1;
        info!(path = %token.path.display(), "refreshed a ServiceAccount token");
    }
    Ok(refreshed)
}
