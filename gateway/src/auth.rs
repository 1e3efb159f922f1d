//! Authentication: turns the `authorization: Bearer …` metadata of every gRPC call into a [`Principal`] attached to
//! the request, or answers `UNAUTHENTICATED` before any service code runs. Health checks and reflection are the
//! only calls that pass without a credential (load balancers and grpcurl must reach them).
//!
//! Secrets are looked up by the id they carry and checked against the stored SHA-256 in constant time; a revoked
//! key or a decommissioned gateway stops working on its next call, since nothing is cached. A gateway that
//! authenticates is recorded as seen.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderMap;

use smartfarm_core::credential::{self, SecretKind};
use smartfarm_core::{Error, Principal, Result};
use smartfarm_store::RegistryStore;
use smartfarm_store::model::{DeviceKind, DeviceState};

/// gRPC paths that need no credential.
const PUBLIC_PATH_PREFIXES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

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
                // A gateway that authenticates is alive: keep its last_seen_time and state current. Gateways call
                // rarely (one long-lived edge stream), so this write costs nothing that matters.
                self.registry.record_devices_seen(&[device.id], smartfarm_core::time::now()).await?;
                Ok(Principal::Gateway { device_id: device.id, farm_id: device.farm_id })
            }
        }
    }
}

fn is_public(path: &str) -> bool {
    PUBLIC_PATH_PREFIXES.iter().any(|prefix| path.starts_with(prefix))
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
