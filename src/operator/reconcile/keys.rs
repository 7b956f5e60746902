//! Stage 3, keys: the app's key material. Not pure, and named so: a key
//! the app's Secret lacks is drawn from the system's random number
//! generator (and becomes permanent once the Secret is applied).

use super::validate::ExistingKeys;
use crate::operator::build::SecretMaterial;
use crate::operator::error::Error;

/// Bytes of a generated key: 32 random bytes are a 64 hex character AJP
/// secret and an AES-256 Tribes key.
const GENERATED_KEY_BYTES: usize = 32;

/// The existing keys, and new random ones for those missing.
pub fn key_material(existing: ExistingKeys) -> Result<SecretMaterial, Error> {
    let ExistingKeys { ajp_secret, tribes_key } = existing;
    let ajp_secret = match ajp_secret {
        Some(kept) => kept,
        None => random_hex(GENERATED_KEY_BYTES)?,
    };
    let tribes_key = match tribes_key {
        Some(kept) => kept,
        None => random_hex(GENERATED_KEY_BYTES)?,
    };
    Ok(SecretMaterial { ajp_secret, tribes_key })
}

/// `n` random bytes as lowercase hex.
fn random_hex(bytes: usize) -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut buffer = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut buffer).map_err(|_| Error::Random)?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::reconcile::is_valid_tribes_key;

    #[test]
    fn existing_keys_are_kept_and_missing_ones_generated_fresh() {
        let kept = key_material(ExistingKeys { ajp_secret: Some("a1".repeat(32)), tribes_key: Some("b2".repeat(32)) })
            .expect("keys");
        assert_eq!(kept, SecretMaterial { ajp_secret: "a1".repeat(32), tribes_key: "b2".repeat(32) });
        let first = key_material(ExistingKeys { ajp_secret: None, tribes_key: None }).expect("keys");
        let second = key_material(ExistingKeys { ajp_secret: None, tribes_key: None }).expect("keys");
        assert!(is_valid_tribes_key(&first.tribes_key) && first.tribes_key.len() == 64);
        assert_eq!(first.ajp_secret.len(), 64);
        assert_ne!(first, second, "random, not derived");
    }
}
