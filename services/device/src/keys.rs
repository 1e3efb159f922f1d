//! Making API keys: used by `CreateApiKey` and by the binary's `admin create-key` and first-start bootstrap, so
//! there is one way a key comes to exist.

use uuid::Uuid;

use smartfarm_core::credential::{self, SecretKind};
use smartfarm_core::{Result, time};
use smartfarm_store::RegistryStore;
use smartfarm_store::model::ApiKey;

/// Creates and stores an API key scoped to `farm_id` (`None`: admin). Returns the record and the secret, which
/// exists nowhere else afterwards.
pub async fn create_api_key(
    registry: &dyn RegistryStore,
    name: &str,
    farm_id: Option<Uuid>,
) -> Result<(ApiKey, String)> {
    let (key, secret) = new_api_key(name, farm_id)?;
    let stored = registry.create_api_key(key).await?;
    Ok((stored, secret))
}

/// Makes an API key's record and secret without storing them, for callers that must put the secret somewhere safe
/// before the key exists (the first start's bootstrap key).
pub fn new_api_key(name: &str, farm_id: Option<Uuid>) -> Result<(ApiKey, String)> {
    let id = Uuid::now_v7();
    let secret = credential::generate(SecretKind::ApiKey, id)?;
    let key = ApiKey {
        id,
        name: name.to_string(),
        farm_id,
        secret_sha256: secret.hash,
        create_time: time::now(),
        revoke_time: None,
    };
    Ok((key, secret.secret))
}
