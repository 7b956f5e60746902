//! Stage 2, validate: pure. Judges an [`Observation`] against the spec:
//! the keys of the app's own Secret must be usable, and the Secrets it
//! names must exist with the keys that are read from them. A [`Problem`]
//! stops the pass before anything is applied (the nodes could not start)
//! and makes the app `Degraded` with its reason.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::observe::Observation;
use crate::crd::ClusterApp;
use crate::operator::names::{AJP_SECRET_KEY, CLIENT_CA_KEY, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY, TRIBES_KEY_KEY};
use crate::operator::status::Problem;

/// Reason of `Degraded` while a Secret named by `spec.balancer.tls` is
/// missing or lacks a key the balancer reads.
pub const TLS_SECRET_MISSING: &str = "TLSSecretMissing";
/// Reason of `Degraded` when the Secret named by `spec.ajp.secretRef` does
/// not exist.
pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
/// Reason of `Degraded` when that Secret lacks the named key.
pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
/// Reason of `Degraded` when the app's Secret holds an unusable Tribes key.
pub const INVALID_ENCRYPTION_KEY: &str = "InvalidEncryptionKey";
/// Reason of `Degraded` when applying a child failed (stage apply).
pub const APPLY_FAILED: &str = "ApplyFailed";

/// An app that passed validation.
pub struct Validated {
    /// The usable keys its own Secret already holds.
    pub existing_keys: ExistingKeys,
}

/// The keys of the app's own Secret, each None when missing (the keys
/// stage generates those). No Debug: key material is never printed.
pub struct ExistingKeys {
    pub ajp_secret: Option<String>,
    pub tribes_key: Option<String>,
}

pub fn validate(app: &ClusterApp, observation: &Observation) -> Result<Validated, Problem> {
    let existing_keys = existing_keys(observation)?;
    check_secret_ref(app, observation)?;
    check_tls_secrets(app, observation)?;
    Ok(Validated { existing_keys })
}

/// The non-empty UTF-8 text of `key` in `secret`.
pub fn secret_value(secret: Option<&Secret>, key: &str) -> Option<String> {
    let bytes: &ByteString = secret?.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok().filter(|v| !v.is_empty())
}

/// An EncryptInterceptor key: 32, 48 or 64 hex characters (AES-128/192/256).
pub fn is_valid_tribes_key(key: &str) -> bool {
    matches!(key.len(), 32 | 48 | 64) && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The keys kept from the app's Secret (never rotated by accident); a
/// Tribes key of the wrong shape is a problem, not replaced: the nodes
/// that use it would no longer understand each other.
fn existing_keys(observation: &Observation) -> Result<ExistingKeys, Problem> {
    let Observation { namespace, names, own_secret, .. } = observation;
    let secret = own_secret.as_ref();
    let tribes_key = secret_value(secret, TRIBES_KEY_KEY);
    if let Some(key) = &tribes_key
        && !is_valid_tribes_key(key)
    {
        return Err(Problem {
            reason: INVALID_ENCRYPTION_KEY.to_string(),
            message: format!(
                "key {TRIBES_KEY_KEY} of Secret {namespace}/{} must be 32, 48 or 64 hex characters; delete the key to have a new one generated",
                names.secret()
            ),
        });
    }
    Ok(ExistingKeys { ajp_secret: secret_value(secret, AJP_SECRET_KEY), tribes_key })
}

/// A `spec.ajp.secretRef` must name an existing key of an existing Secret.
fn check_secret_ref(app: &ClusterApp, observation: &Observation) -> Result<(), Problem> {
    let Some(reference) = &app.spec.ajp.secret_ref else { return Ok(()) };
    let namespace = &observation.namespace;
    match observation.keys_of(&reference.name) {
        None => Err(Problem {
            reason: SECRET_NOT_FOUND.to_string(),
            message: format!(
                "Secret {namespace}/{} named by spec.ajp.secretRef does not exist; create it with the key {}",
                reference.name, reference.key
            ),
        }),
        Some(keys) if !keys.contains(&reference.key) => Err(Problem {
            reason: SECRET_KEY_NOT_FOUND.to_string(),
            message: format!(
                "Secret {namespace}/{} named by spec.ajp.secretRef has no non-empty key {}",
                reference.name, reference.key
            ),
        }),
        Some(_) => Ok(()),
    }
}

/// The Secrets of `spec.balancer.tls` must exist and hold the keys the
/// balancer reads (`tls.crt` and `tls.key`; `ca.crt` of the client CA
/// Secret): a balancer pod whose Secret volume cannot be mounted does not
/// start. Their contents are not checked here: the balancer reloads the
/// files and keeps the last good pair.
fn check_tls_secrets(app: &ClusterApp, observation: &Observation) -> Result<(), Problem> {
    let Some(tls) = &app.spec.balancer.tls else { return Ok(()) };
    const TLS_PAIR: &[&str] = &[TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY];
    const CA: &[&str] = &[CLIENT_CA_KEY];
    let namespace = &observation.namespace;
    let wanted = [
        Some(("spec.balancer.tls.secretName", tls.secret_name.as_str(), TLS_PAIR)),
        tls.client_ca_secret_name.as_deref().map(|name| ("spec.balancer.tls.clientCASecretName", name, CA)),
    ];
    for (field, name, needed) in wanted.into_iter().flatten() {
        let message = match observation.keys_of(name) {
            None => {
                let how = if needed == TLS_PAIR {
                    format!("kubectl create secret tls {name} --cert=CERT.pem --key=KEY.pem -n {namespace}")
                } else {
                    format!("kubectl create secret generic {name} --from-file={CLIENT_CA_KEY}=CA.pem -n {namespace}")
                };
                format!(
                    "Secret {namespace}/{name} named by {field} does not exist; create it with the key{} {}, e.g. `{how}`",
                    if needed.len() > 1 { "s" } else { "" },
                    needed.join(" and ")
                )
            }
            Some(keys) => {
                let missing: Vec<&str> = needed.iter().copied().filter(|key| !keys.contains(*key)).collect();
                if missing.is_empty() {
                    continue;
                }
                format!(
                    "Secret {namespace}/{name} named by {field} has no non-empty key{} {}; the balancer reads {}",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.join(" and "),
                    needed.join(" and ")
                )
            }
        };
        return Err(Problem { reason: TLS_SECRET_MISSING.to_string(), message });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::operator::names::AppNames;

    fn app(spec: &str) -> ClusterApp {
        serde_yaml_ng::from_str(&format!("metadata: {{name: shop, namespace: store}}\nspec: {spec}")).expect("app")
    }

    /// An observation of `shop` with its own Secret holding `own` and the
    /// referenced Secrets `referenced` (name, its non-empty keys or None).
    fn observation(own: &[(&str, &str)], referenced: &[(&str, Option<&[&str]>)]) -> Observation {
        let own_secret = Secret {
            data: Some(own.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()),
            ..Default::default()
        };
        Observation {
            namespace: "store".to_string(),
            names: AppNames::new("shop"),
            own_secret: Some(own_secret),
            pods: Vec::new(),
            stateful_set: None,
            balancer: None,
            referenced_secrets: referenced
                .iter()
                .map(|(name, keys)| {
                    (name.to_string(), keys.map(|ks| ks.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>()))
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn reason(result: Result<Validated, Problem>) -> Option<String> {
        result.err().map(|p| p.reason)
    }

    #[test]
    fn existing_keys_are_kept_and_missing_ones_left_to_generate() {
        let key = "ab".repeat(32);
        let validated = validate(&app("{image: x}"), &observation(&[(TRIBES_KEY_KEY, &key)], &[])).expect("valid");
        assert_eq!(validated.existing_keys.tribes_key.as_deref(), Some(key.as_str()));
        assert_eq!(validated.existing_keys.ajp_secret, None);
    }

    #[test]
    fn a_tribes_key_of_the_wrong_shape_is_a_problem_not_replaced() {
        let problem = validate(&app("{image: x}"), &observation(&[(TRIBES_KEY_KEY, "abc")], &[])).err();
        let problem = problem.expect("a problem");
        assert_eq!(problem.reason, INVALID_ENCRYPTION_KEY);
        assert!(problem.message.contains("store/shop-secrets"), "{}", problem.message);
    }

    #[test]
    fn named_secrets_must_exist_with_their_keys_in_order() {
        let with_ref = app("{image: x, ajp: {secretRef: {name: ajp, key: secret}}}");
        assert_eq!(reason(validate(&with_ref, &observation(&[], &[("ajp", None)]))), Some(SECRET_NOT_FOUND.into()));
        let other_key: &[&str] = &["other"];
        assert_eq!(
            reason(validate(&with_ref, &observation(&[], &[("ajp", Some(other_key))]))),
            Some(SECRET_KEY_NOT_FOUND.into())
        );
        let right_key: &[&str] = &["secret"];
        assert!(validate(&with_ref, &observation(&[], &[("ajp", Some(right_key))])).is_ok());
        let with_tls = app("{image: x, balancer: {tls: {secretName: shop-tls}}}");
        let only_cert: &[&str] = &["tls.crt"];
        let problem = validate(&with_tls, &observation(&[], &[("shop-tls", Some(only_cert))])).err().expect("problem");
        assert_eq!(problem.reason, TLS_SECRET_MISSING);
        assert!(problem.message.contains("has no non-empty key tls.key"), "{}", problem.message);
        // The own Secret's problem is reported first.
        assert_eq!(
            reason(validate(&with_ref, &observation(&[(TRIBES_KEY_KEY, "abc")], &[("ajp", None)]))),
            Some(INVALID_ENCRYPTION_KEY.into())
        );
    }
}
