//! Who is calling: the principal the authentication layer attaches to every request, and the typed checks each RPC
//! makes on the resource it touches. Authentication (turning a bearer token into a principal) lives in the gateway;
//! this module only decides what a known principal may do.

use std::time::Duration;

use uuid::Uuid;

use crate::error::{Error, Result};

/// How often a long-lived stream checks that the API key it was opened with is still in force: a revoked key's
/// stream ends within this time (unary calls are checked on every call; a stream lives on after its call was).
pub const STREAM_CREDENTIAL_RECHECK: Duration = Duration::from_secs(5);

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// An admin API key: may touch every farm and create farms and admin keys.
    Admin { api_key_id: Uuid },
    /// A farm API key: may touch only its own farm's resources.
    FarmKey { api_key_id: Uuid, farm_id: Uuid },
    /// A gateway device's credential, used by the farm's edge agent: may use the edge link of its own farm and read
    /// what the agent needs. `credential_sha256` is the hash the call signed in with: a stream that outlives the call
    /// (the edge link) ends once the device's hash is another.
    Gateway { device_id: Uuid, farm_id: Uuid, credential_sha256: String },
}

impl Principal {
    /// The farm the principal is confined to; `None` for admins.
    pub fn farm_scope(&self) -> Option<Uuid> {
        match self {
            Principal::Admin { .. } => None,
            Principal::FarmKey { farm_id, .. } | Principal::Gateway { farm_id, .. } => Some(*farm_id),
        }
    }

    /// Allows the call only for an API key that may touch `farm_id`'s resources: an admin key, or that farm's key.
    /// Gateway credentials are refused here, so an RPC that forgets to think about gateways stays closed to them;
    /// the edge link and the other calls meant for gateways use [`Principal::gateway_of`].
    pub fn authorize_farm(&self, farm_id: Uuid) -> Result<()> {
        match self {
            Principal::Admin { .. } => Ok(()),
            Principal::FarmKey { farm_id: own, .. } if *own == farm_id => Ok(()),
            Principal::FarmKey { .. } => {
                Err(Error::PermissionDenied("the credential is scoped to another farm".into()))
            }
            Principal::Gateway { .. } => self.require_api_key(),
        }
    }

    /// For calls meant for edge agents: the gateway device and its farm, or `PermissionDenied` for API keys.
    pub fn gateway_of(&self) -> Result<(Uuid, Uuid)> {
        match self {
            Principal::Gateway { device_id, farm_id, .. } => Ok((*device_id, *farm_id)),
            _ => Err(Error::PermissionDenied("this call is for edge agents, with their gateway credential".into())),
        }
    }

    /// Allows the call only for admin API keys.
    pub fn require_admin(&self) -> Result<()> {
        match self {
            Principal::Admin { .. } => Ok(()),
            _ => Err(Error::PermissionDenied("this call needs an admin api key".into())),
        }
    }

    /// Allows the call only for API keys (admin or farm), not for device credentials: managing the registry is
    /// for people and integrations, not for gateways.
    pub fn require_api_key(&self) -> Result<()> {
        match self {
            Principal::Admin { .. } | Principal::FarmKey { .. } => Ok(()),
            Principal::Gateway { .. } => {
                Err(Error::PermissionDenied("a gateway credential may not call this; use an api key".into()))
            }
        }
    }

    /// The API key calling, `None` for a gateway.
    pub fn api_key_id(&self) -> Option<Uuid> {
        match self {
            Principal::Admin { api_key_id } | Principal::FarmKey { api_key_id, .. } => Some(*api_key_id),
            Principal::Gateway { .. } => None,
        }
    }

    /// A short description for logs, never containing a secret.
    pub fn describe(&self) -> String {
        match self {
            Principal::Admin { api_key_id } => format!("admin key {api_key_id}"),
            Principal::FarmKey { api_key_id, farm_id } => format!("farm key {api_key_id} (farm {farm_id})"),
            Principal::Gateway { device_id, .. } => format!("gateway {device_id}"),
        }
    }

    /// The principal the authentication layer attached to a request. Its absence is a wiring bug (a service mounted
    /// outside the auth layer), answered as unauthenticated rather than trusted.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Principal> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("missing credentials".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn farm_keys_are_confined_to_their_farm() {
        let farm = Uuid::now_v7();
        let other = Uuid::now_v7();
        let key = Principal::FarmKey { api_key_id: Uuid::now_v7(), farm_id: farm };
        assert!(key.authorize_farm(farm).is_ok());
        assert!(matches!(key.authorize_farm(other), Err(Error::PermissionDenied(_))));
        assert!(key.require_admin().is_err());
        assert!(key.require_api_key().is_ok());

        let admin = Principal::Admin { api_key_id: Uuid::now_v7() };
        assert!(admin.authorize_farm(other).is_ok());
        assert!(admin.require_admin().is_ok());

        assert!(key.gateway_of().is_err());

        let device_id = Uuid::now_v7();
        let gateway = Principal::Gateway { device_id, farm_id: farm, credential_sha256: "00".repeat(32) };
        assert!(gateway.authorize_farm(farm).is_err(), "gateways are refused unless a call is meant for them");
        assert!(gateway.require_api_key().is_err());
        assert_eq!(gateway.gateway_of().unwrap(), (device_id, farm));
    }
}
