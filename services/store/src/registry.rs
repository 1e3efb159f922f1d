//! The device registry's storage: farms, devices and API keys. Every backend implements [`RegistryStore`] and
//! passes the same suite (`tests/registry_suite.rs`).

use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_core::Result;

use crate::model::{ApiKey, Device, DeviceFilter, DeviceUpdate, Farm, KeysetPage, NewDevice};

/// Storage of farms, devices and API keys.
///
/// Errors: `NotFound` for a missing record, `AlreadyExists` for a duplicate name, `FailedPrecondition` for a change
/// a decommissioned device cannot take, `Unavailable` when the database cannot be reached, `Internal` otherwise.
#[async_trait::async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Stores a new farm. Names are unique.
    async fn create_farm(&self, id: Uuid, name: &str, create_time: SystemTime) -> Result<Farm>;
    /// Reads a farm.
    async fn get_farm(&self, id: Uuid) -> Result<Farm>;
    /// Lists farms in id order; `only` restricts the list to one farm (what a farm key sees).
    async fn list_farms(&self, only: Option<Uuid>, page: KeysetPage) -> Result<Vec<Farm>>;

    /// Stores a new device. The farm must exist; names are unique within a farm among devices in service.
    async fn create_device(&self, device: NewDevice) -> Result<Device>;
    /// Reads a device.
    async fn get_device(&self, id: Uuid) -> Result<Device>;
    /// Lists devices in id order.
    async fn list_devices(&self, filter: &DeviceFilter, page: KeysetPage) -> Result<Vec<Device>>;
    /// Changes a device's name or labels. Decommissioned devices cannot be changed.
    async fn update_device(&self, id: Uuid, update: DeviceUpdate, update_time: SystemTime) -> Result<Device>;
    /// Decommissions a device and drops its credential. Returns the device unchanged if it already was.
    async fn decommission_device(&self, id: Uuid, update_time: SystemTime) -> Result<Device>;
    /// Replaces a device's credential hash. Decommissioned devices cannot get one.
    async fn set_device_credential(&self, id: Uuid, credential_sha256: &str, update_time: SystemTime)
    -> Result<Device>;
    /// Records that the devices were heard from at `seen_time`: `last_seen_time` only moves forward, and a
    /// provisioned device becomes active. Unknown and decommissioned ids are ignored.
    async fn record_devices_seen(&self, ids: &[Uuid], seen_time: SystemTime) -> Result<()>;

    /// Stores a new API key.
    async fn create_api_key(&self, key: ApiKey) -> Result<ApiKey>;
    /// Reads an API key, revoked or not.
    async fn get_api_key(&self, id: Uuid) -> Result<ApiKey>;
    /// `Ok` while the API key `id` is in force; `Unauthenticated` once it is revoked or gone. Long-lived streams ask
    /// this now and then (see `smartfarm_core::principal::STREAM_CREDENTIAL_RECHECK`): their call was checked only
    /// when they opened.
    async fn api_key_in_force(&self, id: Uuid) -> Result<()> {
        match self.get_api_key(id).await {
            Ok(key) if key.revoke_time.is_none() => Ok(()),
            Ok(_) | Err(smartfarm_core::Error::NotFound { .. }) => Err(smartfarm_core::Error::Unauthenticated(
                "the API key this stream was opened with was revoked".into(),
            )),
            Err(error) => Err(error),
        }
    }
    /// Lists API keys in id order; `farm_id` restricts the list to one farm's keys.
    async fn list_api_keys(&self, farm_id: Option<Uuid>, page: KeysetPage) -> Result<Vec<ApiKey>>;
    /// Revokes a key. Returns it unchanged if it already was.
    async fn revoke_api_key(&self, id: Uuid, revoke_time: SystemTime) -> Result<ApiKey>;
    /// How many API keys exist, revoked ones included (zero means a fresh installation).
    async fn count_api_keys(&self) -> Result<u64>;
}
