//! Secrets that identify callers: API keys and device credentials. A secret is shown once when it is made; only its
//! SHA-256 is stored, and the cloud and the edge agent check a presented secret against that hash.
//!
//! Formats (the prefix tells what a leaked string is, as GitHub's tokens do):
//! - API key: `sfk_<key id as 32 hex digits>_<43 base64url characters of randomness>`
//! - Device credential: `sfd_<device id as 32 hex digits>_<43 base64url characters of randomness>`
//!
//! The id inside the secret lets the server find the record with one lookup; the 256 random bits make guessing
//! hopeless, which is why a fast hash (not a password hash) is the right one here.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::{Error, Result};

/// What a secret authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// An API key.
    ApiKey,
    /// A device's credential.
    Device,
}

impl SecretKind {
    fn prefix(self) -> &'static str {
        match self {
            SecretKind::ApiKey => "sfk",
            SecretKind::Device => "sfd",
        }
    }
}

/// A freshly made secret: the string to show once, and the hash to store.
#[derive(Debug)]
pub struct NewSecret {
    /// The whole secret; give it to the caller and forget it.
    pub secret: String,
    /// Hex SHA-256 of `secret`; store this.
    pub hash: String,
}

/// Makes a new secret for the record `id`.
pub fn generate(kind: SecretKind, id: Uuid) -> Result<NewSecret> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|error| Error::internal("read the system's random source", error))?;
    let secret = format!(
        "{}_{}_{}",
        kind.prefix(),
        id.simple(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    );
    let hash = hash(&secret);
    Ok(NewSecret { secret, hash })
}

/// Hex SHA-256 of a secret, as stored.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` matches the stored `stored_hash`, compared in constant time.
pub fn verify(secret: &str, stored_hash: &str) -> bool {
    hash(secret).as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// Reads the kind and record id out of a presented secret, without checking it. Anything malformed is
/// `Unauthenticated`, with a message that never repeats the secret.
pub fn parse(secret: &str) -> Result<(SecretKind, Uuid)> {
    let malformed = || Error::Unauthenticated("malformed credential".into());
    let mut parts = secret.splitn(3, '_');
    let kind = match parts.next() {
        Some("sfk") => SecretKind::ApiKey,
        Some("sfd") => SecretKind::Device,
        _ => return Err(malformed()),
    };
    let id = parts.next().ok_or_else(malformed)?;
    let random = parts.next().ok_or_else(malformed)?;
    if id.len() != 32 || random.len() != 43 {
        return Err(malformed());
    }
    let id = Uuid::try_parse(id).map_err(|_| malformed())?;
    Ok((kind, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_parse_and_verify() {
        let id = Uuid::now_v7();
        let made = generate(SecretKind::Device, id).unwrap();
        assert!(made.secret.starts_with("sfd_"));
        assert_eq!(parse(&made.secret).unwrap(), (SecretKind::Device, id));
        assert!(verify(&made.secret, &made.hash));
        let other = generate(SecretKind::Device, id).unwrap();
        assert_ne!(made.secret, other.secret);
        assert!(!verify(&other.secret, &made.hash));
    }

    #[test]
    fn malformed_secrets_are_unauthenticated() {
        for bad in ["", "sfk", "sfk_123_abc", "xyz_0193a4b2000070008000000000000000_", "Bearer sfk_"] {
            assert!(matches!(parse(bad), Err(Error::Unauthenticated(_))), "{bad:?}");
        }
    }
}
