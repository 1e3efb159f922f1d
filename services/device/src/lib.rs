//! smartfarm-device owns the device registry's API: the `DeviceService` handlers (farms, devices, credentials,
//! API keys), their validation and their per-farm authorisation. It reads and writes through
//! [`smartfarm_store::RegistryStore`] and holds no SQL.

#![forbid(unsafe_code)]

mod convert;
mod keys;

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use smartfarm_core::credential::{self, SecretKind};
use smartfarm_core::paging::Page;
use smartfarm_core::{Error, Principal, time, validate};
use smartfarm_proto::device::v1 as pb;
use smartfarm_proto::device::v1::device_service_server::{DeviceService, DeviceServiceServer};
use smartfarm_store::RegistryStore;
use smartfarm_store::model::{Device, DeviceFilter, DeviceKind, DeviceUpdate, KeysetPage, NewDevice};

pub use keys::{create_api_key, new_api_key};

/// The fields `UpdateDevice` can change, as `update_mask` paths.
const UPDATABLE_DEVICE_FIELDS: &[&str] = &["name", "labels"];

/// The `DeviceService` implementation.
#[derive(Clone)]
pub struct DeviceApi {
    registry: Arc<dyn RegistryStore>,
}

impl DeviceApi {
    /// A service over `registry`.
    pub fn new(registry: Arc<dyn RegistryStore>) -> DeviceApi {
        DeviceApi { registry }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> DeviceServiceServer<DeviceApi> {
        DeviceServiceServer::new(self)
    }

    /// The device `id_field` names, if the caller may touch its farm.
    async fn authorized_device(&self, principal: &Principal, id_field: &str, id: &str) -> Result<Device, Error> {
        let device = self.registry.get_device(validate::id(id_field, id)?).await?;
        principal.authorize_farm(device.farm_id)?;
        Ok(device)
    }

    /// The farm a list is confined to: a farm key's own farm (asking for another is denied), or for admins the
    /// farm the request names, if any.
    fn list_scope(principal: &Principal, requested_farm_id: &str) -> Result<Option<Uuid>, Error> {
        let requested = validate::optional_id("farm_id", requested_farm_id)?;
        match (principal.farm_scope(), requested) {
            (None, requested) => Ok(requested),
            (Some(own), None) => Ok(Some(own)),
            (Some(_), Some(requested)) => principal.authorize_farm(requested).map(|()| Some(requested)),
        }
    }
}

/// The caller of a registry RPC: managing the registry is for API keys (people and integrations), not for
/// gateway credentials.
fn api_caller<T>(request: &Request<T>) -> Result<Principal, Error> {
    let principal = Principal::of(request)?;
    principal.require_api_key()?;
    Ok(principal)
}

fn filter_fingerprint<'a>(parts: impl IntoIterator<Item = (&'a str, String)>) -> String {
    parts.into_iter().map(|(name, value)| format!("{name}={value};")).collect()
}

/// A gateway's credential opens its farm's edge link (commands, rules, alerts, readings): like an API key, it would
/// let a leaked farm key outlive its revocation, so only admin keys make one.
fn require_admin_for_gateways(principal: &Principal) -> smartfarm_core::Result<()> {
    principal.require_admin().map_err(|_| {
        Error::PermissionDenied(
            "only admin keys register gateways or rotate their credentials: a gateway credential would outlive a \
             farm key's revocation"
                .into(),
        )
    })
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn create_farm(
        &self,
        request: Request<pb::CreateFarmRequest>,
    ) -> Result<Response<pb::CreateFarmResponse>, Status> {
        let principal = api_caller(&request)?;
        principal.require_admin()?;
        let name = validate::name("name", &request.get_ref().name)?;
        let farm = self.registry.create_farm(Uuid::now_v7(), &name, time::now()).await?;
        tracing::info!(farm_id = %farm.id, by = %principal.describe(), "farm created");
        Ok(Response::new(pb::CreateFarmResponse { farm: Some(convert::farm(&farm)) }))
    }

    async fn get_farm(&self, request: Request<pb::GetFarmRequest>) -> Result<Response<pb::GetFarmResponse>, Status> {
        let principal = api_caller(&request)?;
        let farm_id = validate::id("farm_id", &request.get_ref().farm_id)?;
        principal.authorize_farm(farm_id)?;
        let farm = self.registry.get_farm(farm_id).await?;
        Ok(Response::new(pb::GetFarmResponse { farm: Some(convert::farm(&farm)) }))
    }

    async fn list_farms(
        &self,
        request: Request<pb::ListFarmsRequest>,
    ) -> Result<Response<pb::ListFarmsResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let fingerprint = "farms";
        let page = Page::from_request(message.page_size, &message.page_token, fingerprint)?;
        let farms = self
            .registry
            .list_farms(principal.farm_scope(), KeysetPage { after: page.after_id()?, limit: page.fetch_limit() })
            .await?;
        let (farms, next_page_token) = page.finish(farms, |farm| farm.id.to_string(), fingerprint);
        Ok(Response::new(pb::ListFarmsResponse { farms: farms.iter().map(convert::farm).collect(), next_page_token }))
    }

    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = validate::id("farm_id", &message.farm_id)?;
        let name = validate::name("name", &message.name)?;
        let kind = convert::kind_from_proto(message.kind)?.ok_or_else(|| Error::invalid("kind", "is required"))?;
        let labels = validate::labels("labels", &message.labels)?;
        principal.authorize_farm(farm_id)?;
        if kind == DeviceKind::Gateway {
            require_admin_for_gateways(&principal)?;
        }

        let id = Uuid::now_v7();
        let secret = credential::generate(SecretKind::Device, id)?;
        let device = self
            .registry
            .create_device(NewDevice {
                id,
                farm_id,
                name,
                kind,
                labels,
                credential_sha256: secret.hash,
                create_time: time::now(),
            })
            .await?;
        tracing::info!(device_id = %device.id, farm_id = %farm_id, kind = device.kind.as_str(), by = %principal.describe(), "device registered");
        Ok(Response::new(pb::RegisterDeviceResponse {
            device: Some(convert::device(&device)),
            credential: secret.secret,
        }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        let principal = api_caller(&request)?;
        let device = self.authorized_device(&principal, "device_id", &request.get_ref().device_id).await?;
        Ok(Response::new(pb::GetDeviceResponse { device: Some(convert::device(&device)) }))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let filter = DeviceFilter {
            farm_id: Self::list_scope(&principal, &message.farm_id)?,
            kind: convert::kind_from_proto(message.kind)?,
            state: convert::state_from_proto(message.state)?,
        };
        let fingerprint = filter_fingerprint([
            ("farm", format!("{:?}", filter.farm_id)),
            ("kind", message.kind.to_string()),
            ("state", message.state.to_string()),
        ]);
        let page = Page::from_request(message.page_size, &message.page_token, &fingerprint)?;
        let devices = self
            .registry
            .list_devices(&filter, KeysetPage { after: page.after_id()?, limit: page.fetch_limit() })
            .await?;
        let (devices, next_page_token) = page.finish(devices, |device| device.id.to_string(), &fingerprint);
        Ok(Response::new(pb::ListDevicesResponse {
            devices: devices.iter().map(convert::device).collect(),
            next_page_token,
        }))
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::UpdateDeviceResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let device = message.device.as_ref().ok_or_else(|| Error::invalid("device", "is required"))?;
        let paths = message.update_mask.as_ref().map(|mask| mask.paths.as_slice()).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                format!("is required: name the fields to change ({})", UPDATABLE_DEVICE_FIELDS.join(", ")),
            )
            .into());
        }
        let mut update = DeviceUpdate::default();
        for path in paths {
            match path.as_str() {
                "name" => update.name = Some(validate::name("device.name", &device.name)?),
                "labels" => update.labels = Some(validate::labels("device.labels", &device.labels)?),
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!(
                            "{} cannot be updated; updatable fields: {}",
                            validate::excerpt(other),
                            UPDATABLE_DEVICE_FIELDS.join(", ")
                        ),
                    )
                    .into());
                }
            }
        }
        let device_id = self.authorized_device(&principal, "device.id", &device.id).await?.id;
        let updated = self.registry.update_device(device_id, update, time::now()).await?;
        tracing::info!(device_id = %device_id, by = %principal.describe(), "device updated");
        Ok(Response::new(pb::UpdateDeviceResponse { device: Some(convert::device(&updated)) }))
    }

    async fn decommission_device(
        &self,
        request: Request<pb::DecommissionDeviceRequest>,
    ) -> Result<Response<pb::DecommissionDeviceResponse>, Status> {
        let principal = api_caller(&request)?;
        let device_id = self.authorized_device(&principal, "device_id", &request.get_ref().device_id).await?.id;
        let device = self.registry.decommission_device(device_id, time::now()).await?;
        tracing::info!(device_id = %device_id, by = %principal.describe(), "device decommissioned");
        Ok(Response::new(pb::DecommissionDeviceResponse { device: Some(convert::device(&device)) }))
    }

    async fn rotate_device_credential(
        &self,
        request: Request<pb::RotateDeviceCredentialRequest>,
    ) -> Result<Response<pb::RotateDeviceCredentialResponse>, Status> {
        let principal = api_caller(&request)?;
        let device = self.authorized_device(&principal, "device_id", &request.get_ref().device_id).await?;
        if device.kind == DeviceKind::Gateway {
            require_admin_for_gateways(&principal)?;
        }
        let device_id = device.id;
        let secret = credential::generate(SecretKind::Device, device_id)?;
        let device = self.registry.set_device_credential(device_id, &secret.hash, time::now()).await?;
        tracing::info!(device_id = %device_id, by = %principal.describe(), "device credential rotated");
        Ok(Response::new(pb::RotateDeviceCredentialResponse {
            device: Some(convert::device(&device)),
            credential: secret.secret,
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let name = validate::name("name", &message.name)?;
        let farm_id = validate::optional_id("farm_id", &message.farm_id)?;
        // Only admins mint keys: a farm key that could mint farm keys would let a leaked key outlive its own
        // revocation.
        principal.require_admin()?;
        let (key, secret) = keys::create_api_key(&*self.registry, &name, farm_id).await?;
        tracing::info!(api_key_id = %key.id, farm_id = ?key.farm_id, by = %principal.describe(), "api key created");
        Ok(Response::new(pb::CreateApiKeyResponse { api_key: Some(convert::api_key(&key)), secret }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = Self::list_scope(&principal, &message.farm_id)?;
        let fingerprint = filter_fingerprint([("farm", format!("{farm_id:?}"))]);
        let page = Page::from_request(message.page_size, &message.page_token, &fingerprint)?;
        let keys = self
            .registry
            .list_api_keys(farm_id, KeysetPage { after: page.after_id()?, limit: page.fetch_limit() })
            .await?;
        let (keys, next_page_token) = page.finish(keys, |key| key.id.to_string(), &fingerprint);
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(convert::api_key).collect(),
            next_page_token,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let principal = api_caller(&request)?;
        let key_id = validate::id("api_key_id", &request.get_ref().api_key_id)?;
        let key = self.registry.get_api_key(key_id).await?;
        match key.farm_id {
            None => principal.require_admin()?,
            Some(farm_id) => principal.authorize_farm(farm_id)?,
        }
        let revoked = self.registry.revoke_api_key(key_id, time::now()).await?;
        tracing::info!(api_key_id = %key_id, by = %principal.describe(), "api key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse { api_key: Some(convert::api_key(&revoked)) }))
    }
}
