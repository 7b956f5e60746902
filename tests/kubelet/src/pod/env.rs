//! Container environment: values, field and resource references, ConfigMap
//! and Secret keys, envFrom, and `$(VAR)` expansion with Kubernetes' rules.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, ResourceRequirements, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{Api, Client};

/// ConfigMaps and Secrets of the Pod's namespace, fetched once per use.
/// The node identity may `get` exactly those the Pod references.
pub struct ApiObjects {
    configmaps: Api<ConfigMap>,
    secrets: Api<Secret>,
    configmap_cache: HashMap<String, Option<ConfigMap>>,
    secret_cache: HashMap<String, Option<Secret>>,
}

impl ApiObjects {
    pub fn new(client: &Client, namespace: &str) -> ApiObjects {
        ApiObjects {
            configmaps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client.clone(), namespace),
            configmap_cache: HashMap::new(),
            secret_cache: HashMap::new(),
        }
    }

    /// The ConfigMap's keys (data and binaryData), or None if it does not exist.
    pub async fn configmap(&mut self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        if !self.configmap_cache.contains_key(name) {
            let found = self.configmaps.get_opt(name).await.map_err(|e| format!("getting configmap {name:?}: {e}"))?;
            self.configmap_cache.insert(name.to_string(), found);
        }
        Ok(self.configmap_cache.get(name).and_then(|c| c.as_ref()).map(|cm| {
            let mut keys: BTreeMap<String, Vec<u8>> =
                cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
            keys.extend(cm.binary_data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())));
            keys
        }))
    }

    pub async fn secret(&mut self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        if !self.secret_cache.contains_key(name) {
            let found = self.secrets.get_opt(name).await.map_err(|e| format!("getting secret {name:?}: {e}"))?;
            self.secret_cache.insert(name.to_string(), found);
        }
        Ok(self
            .secret_cache
            .get(name)
            .and_then(|s| s.as_ref())
            .map(|s| s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect()))
    }
}

/// Facts about the running Pod that field references read.
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: &'a str,
}

fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    // Downward API file format: key="value" lines, sorted by key.
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn subscript<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')?;
    rest.strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .or_else(|| rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
}

/// A `fieldRef.fieldPath` value.
pub fn field_value(facts: &PodFacts<'_>, path: &str) -> Result<String, String> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => facts.node_name.to_string(),
        "spec.serviceAccountName" => {
            spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into())
        }
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        other => {
            if let Some(key) = subscript(other, "metadata.labels") {
                meta.labels.as_ref().and_then(|l| l.get(key)).cloned().unwrap_or_default()
            } else if let Some(key) = subscript(other, "metadata.annotations") {
                meta.annotations.as_ref().and_then(|a| a.get(key)).cloned().unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldPath {other:?}"));
            }
        }
    })
}

/// Parses a Kubernetes quantity into a float of base units.
pub fn quantity_value(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        s if s.starts_with('e') || s.starts_with('E') => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// A `resourceFieldRef` value: the container's limit (or request), falling
/// back to the node's allocatable for limits, divided by `divisor`, rounded up.
pub fn resource_value(
    container: &Container,
    resource: &str,
    divisor: Option<&Quantity>,
    node_cpu: &str,
    node_memory: &str,
) -> Result<String, String> {
    let resources: Option<&ResourceRequirements> = container.resources.as_ref();
    let (kind, name) = resource.split_once('.').ok_or_else(|| format!("unsupported resource {resource:?}"))?;
    let from = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    let fallback = match name {
        "cpu" if kind == "limits" => node_cpu.to_string(),
        "memory" if kind == "limits" => node_memory.to_string(),
        "cpu" | "memory" | "ephemeral-storage" => "0".to_string(),
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    let value = from.and_then(|m| m.get(name)).map(|q| q.0.clone()).unwrap_or(fallback);
    let value = quantity_value(&value).ok_or_else(|| format!("bad quantity {value:?}"))?;
    let divisor = divisor.and_then(|d| quantity_value(&d.0)).filter(|d| *d > 0.0).unwrap_or(1.0);
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// `$(VAR)` expansion as Kubernetes does it: `$$` is a literal `$`, a
/// reference to an unknown variable stays as written.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(close) = body.find(')')
        {
            let name = &body[..close];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment in order of precedence: `base` (image and
/// kubelet-provided variables), then envFrom, then env.
pub async fn container_env(
    objects: &mut ApiObjects,
    facts: &PodFacts<'_>,
    container: &Container,
    base: &[(String, String)],
    node_cpu: &str,
    node_memory: &str,
) -> Result<Vec<(String, String)>, String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    let set = |order: &mut Vec<String>, values: &mut HashMap<String, String>, k: String, v: String| {
        if !values.contains_key(&k) {
            order.push(k.clone());
        }
        values.insert(k, v);
    };
    for (k, v) in base {
        set(&mut order, &mut values, k.clone(), v.clone());
    }
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (keys, optional, what) = if let Some(r) = &source.config_map_ref {
            (objects.configmap(&r.name).await?, r.optional.unwrap_or(false), format!("configmap {:?}", r.name))
        } else if let Some(r) = &source.secret_ref {
            (objects.secret(&r.name).await?, r.optional.unwrap_or(false), format!("secret {:?}", r.name))
        } else {
            continue;
        };
        match keys {
            Some(keys) => {
                for (k, v) in keys {
                    set(&mut order, &mut values, format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                }
            }
            None if optional => {}
            None => return Err(format!("{what} not found")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(source) = &var.value_from {
            if let Some(f) = &source.field_ref {
                Some(field_value(facts, &f.field_path)?)
            } else if let Some(r) = &source.resource_field_ref {
                Some(resource_value(container, &r.resource, r.divisor.as_ref(), node_cpu, node_memory)?)
            } else if let Some(r) = &source.config_map_key_ref {
                match objects.configmap(&r.name).await? {
                    Some(keys) => match keys.get(&r.key) {
                        Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                        None if r.optional.unwrap_or(false) => None,
                        None => return Err(format!("couldn't find key {} in ConfigMap {}", r.key, r.name)),
                    },
                    None if r.optional.unwrap_or(false) => None,
                    None => return Err(format!("configmap {:?} not found", r.name)),
                }
            } else if let Some(r) = &source.secret_key_ref {
                match objects.secret(&r.name).await? {
                    Some(keys) => match keys.get(&r.key) {
                        Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                        None if r.optional.unwrap_or(false) => None,
                        None => return Err(format!("couldn't find key {} in Secret {}", r.key, r.name)),
                    },
                    None if r.optional.unwrap_or(false) => None,
                    None => return Err(format!("secret {:?} not found", r.name)),
                }
            } else {
                None
            }
        } else {
            Some(expand(var.value.as_deref().unwrap_or(""), &values))
        };
        if let Some(value) = value {
            set(&mut order, &mut values, var.name.clone(), value);
        }
    }
    Ok(order.into_iter().filter_map(|k| values.remove_entry(&k)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars: HashMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)-$A-$", &vars), "x-$(B)-$(A)-$A-$");
        assert_eq!(expand("pre$(A", &vars), "pre$(A");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_value("500m"), Some(0.5));
        assert_eq!(quantity_value("1Gi"), Some(1073741824.0));
        assert_eq!(quantity_value("2"), Some(2.0));
    }
}
