//! Authentication: turns the `authorization: Bearer …` metadata of every gRPC call into a [`Principal`] attached to
//! the request, or answers `UNAUTHENTICATED` before any service code runs. Health checks and reflection are the
//! only calls that pass without a credential (load balancers and grpcurl must reach them).
//!
//! Secrets are looked up by the id they carry and checked against the stored SHA-256 in constant time; nothing is
//! cached, so a revoked key or a decommissioned gateway is refused on its next call. A stream is authenticated when
//! it opens: long-lived streams (the edge link, alert subscriptions) must re-check their credential themselves or be
//! cancelled on revocation. A gateway that authenticates is recorded as seen.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderMap;

use smartfarm_core::credential::{self, SecretKind};
use smartfarm_core::{Error, Principal, Result};
use smartfarm_store::RegistryStore;
use smartfarm_store::model::{Device, DeviceKind, DeviceState};

/// Resolves bearer tokens against the registry.
#[derive(Clone)]
pub struct Authenticator {
    registry: Arc<dyn RegistryStore>,
}

impl Authenticator {
    /// An authenticator backed by `registry`.
    pub fn new(registry: Arc<dyn RegistryStore>) -> Authenticator {
        Authenticator { registry }
    }

    /// The principal a request's headers prove, or why not.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal> {
        let header = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
            Error::Unauthenticated("missing credentials: send `authorization: Bearer <api key>` metadata".into())
        })?;
        let token = header
            .to_str()
            .ok()
            // The scheme is case-insensitive (RFC 9110); people type "bearer" too.
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| Error::Unauthenticated("authorization metadata must be `Bearer <token>`".into()))?;
        let (kind, id) = credential::parse(token)?;
        let invalid = || Error::Unauthenticated("invalid or revoked credential".into());
        match kind {
            SecretKind::ApiKey => {
                let key = match self.registry.get_api_key(id).await {
                    Err(Error::NotFound { .. }) => return Err(invalid()),
                    other => other?,
                };
                if key.revoke_time.is_some() || !credential::verify(token, &key.secret_sha256) {
                    return Err(invalid());
                }
                Ok(match key.farm_id {
                    None => Principal::Admin { api_key_id: key.id },
                    Some(farm_id) => Principal::FarmKey { api_key_id: key.id, farm_id },
                })
            }
            SecretKind::Device => {
                let device = match self.registry.get_device(id).await {
                    Err(Error::NotFound { .. }) => return Err(invalid()),
                    other => other?,
                };
                let hash_matches =
                    device.credential_sha256.as_deref().is_some_and(|stored| credential::verify(token, stored));
                if device.state == DeviceState::Decommissioned || !hash_matches {
                    return Err(invalid());
                }
                if device.kind != DeviceKind::Gateway {
                    return Err(Error::PermissionDenied(
                        "only gateway credentials may call the cloud; sensors talk to their farm's edge agent".into(),
                    ));
                }
                self.record_gateway_seen(&device).await;
                let credential_sha256 = device.credential_sha256.clone().unwrap_or_default();
                Ok(Principal::Gateway { device_id: device.id, farm_id: device.farm_id, credential_sha256 })
            }
        }
    }

    /// A gateway that authenticates is alive: keep its `last_seen_time` and state current. At most one write a
    /// minute per gateway, and a failed write only logs: it must not fail the call it rides on.
    async fn record_gateway_seen(&self, device: &Device) {
        let now = smartfarm_core::time::now();
        let recently = device
            .last_seen_time
            .is_some_and(|seen| now.duration_since(seen).is_ok_and(|age| age < GATEWAY_SEEN_RESOLUTION));
        if recently && device.state == DeviceState::Active {
            return;
        }
        if let Err(error) = self.registry.record_devices_seen(&[device.id], now).await {
            tracing::warn!(device_id = %device.id, %error, "cannot record that the gateway was seen");
        }
    }
}

/// How stale a gateway's `last_seen_time` may get before an authenticated call refreshes it.
const GATEWAY_SEEN_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a gRPC path (`/package.Service/Method`) belongs to a service that needs no credential.
fn is_public(path: &str) -> bool {
    let service = path.strip_prefix('/').and_then(|rest| rest.split_once('/')).map(|(service, _)| service);
    service.is_some_and(|service| crate::INFRASTRUCTURE_SERVICES.contains(&service))
}

/// The axum middleware: attaches the principal, or answers with the gRPC error.
pub async fn require_principal(
    State(authenticator): State<Authenticator>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_public(request.uri().path()) {
        return next.run(request).await;
    }
    match authenticator.authenticate(request.headers()).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => {
            let reason = match &error {
                Error::Unauthenticated(_) => "unauthenticated",
                Error::PermissionDenied(_) => "permission_denied",
                _ => "error",
            };
            metrics::counter!("smartfarm_auth_rejections_total", "reason" => reason).increment(1);
            tonic::Status::from(error).into_http()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_public;

    #[test]
    fn only_health_and_reflection_are_public() {
        assert!(is_public("/grpc.health.v1.Health/Check"));
        assert!(is_public("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!is_public("/grpc.health.v1.HealthX/Check"), "a prefix of a public name is not public");
        assert!(!is_public("/smartfarm.device.v1.DeviceService/ListFarms"));
        assert!(!is_public("/grpc.health.v1.Health"));
        assert!(!is_public("/metrics"));
    }
}
