//! The farm's devices as the cloud last pushed them, cached on disk next to the spool, so the agent authenticates
//! its sensors while offline and after a reboot without the cloud.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use smartfarm_proto::ingestion::v1::RegistrySnapshot;

/// A device the agent knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedDevice {
    pub name: String,
    /// `smartfarm.device.v1.DeviceKind` as a number.
    pub kind: i32,
    /// Hex SHA-256 of the device's credential.
    pub credential_sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Snapshot {
    version: u64,
    devices: HashMap<Uuid, CachedDevice>,
}

/// Why a sensor was not let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// The username is not a device of this farm.
    UnknownDevice,
    /// The password is not the device's credential.
    BadCredential,
}

/// The cache.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    snapshot: RwLock<Snapshot>,
    /// The version applied last, for those who act on a change (the broker cuts connections whose login no longer
    /// holds).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// Loads the cache from `dir/registry.json` (empty if there is none yet, or if it is unreadable: the cloud
    /// sends a fresh one on the next connection).
    pub fn load(dir: &Path) -> Registry {
        let path = dir.join("registry.json");
        let snapshot = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "registry cache unreadable; waiting for the cloud's");
                Snapshot::default()
            }),
            Err(_) => Snapshot::default(),
        };
        let (changed, _) = tokio::sync::watch::channel(snapshot.version);
        Registry { path, snapshot: RwLock::new(snapshot), changed }
    }

    /// The version of the cached snapshot (0: none yet).
    pub fn version(&self) -> u64 {
        self.snapshot.read().expect("registry lock").version
    }

    /// How many devices are cached.
    pub fn len(&self) -> usize {
        self.snapshot.read().expect("registry lock").devices.len()
    }

    /// Whether no device is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the cache with what the cloud pushed, and writes it to disk (atomically).
    pub fn apply(&self, pushed: &RegistrySnapshot) -> std::io::Result<()> {
        let devices = pushed
            .devices
            .iter()
            .filter_map(|device| {
                let id = Uuid::try_parse(&device.device_id).ok()?;
                Some((
                    id,
                    CachedDevice {
                        name: device.name.clone(),
                        kind: device.kind,
                        credential_sha256: device.credential_sha256.clone(),
                    },
                ))
            })
            .collect();
        let snapshot = Snapshot { version: pushed.version, devices };
        let bytes = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
        crate::spool::write_file_durably(&self.path, &bytes)?;
        *self.snapshot.write().expect("registry lock") = snapshot;
        self.changed.send_replace(pushed.version);
        Ok(())
    }

    /// Told each time a snapshot is applied.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The hash of device `id`'s credential, if it is a device of the farm.
    pub fn credential_sha256(&self, id: &Uuid) -> Option<String> {
        self.snapshot.read().expect("registry lock").devices.get(id).map(|device| device.credential_sha256.clone())
    }

    /// The sensors of the farm (the devices that send readings).
    pub fn sensors(&self) -> Vec<Uuid> {
        let sensor = smartfarm_proto::device::v1::DeviceKind::Sensor as i32;
        let snapshot = self.snapshot.read().expect("registry lock");
        snapshot.devices.iter().filter(|(_, device)| device.kind == sensor).map(|(id, _)| *id).collect()
    }

    /// Checks an MQTT username (the device id) and password (its credential).
    pub fn authenticate(&self, username: &str, password: &str) -> Result<Uuid, AuthFailure> {
        let id = Uuid::try_parse(username).map_err(|_| AuthFailure::UnknownDevice)?;
        let snapshot = self.snapshot.read().expect("registry lock");
        let device = snapshot.devices.get(&id).ok_or(AuthFailure::UnknownDevice)?;
        if smartfarm_core::credential::verify(password, &device.credential_sha256) {
            Ok(id)
        } else {
            Err(AuthFailure::BadCredential)
        }
    }

    /// Whether `id` is a device of the farm.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.snapshot.read().expect("registry lock").devices.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartfarm_proto::ingestion::v1::EdgeDevice;

    #[test]
    fn a_pushed_registry_authenticates_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::load(dir.path());
        assert_eq!((registry.version(), registry.len()), (0, 0));
        let id = Uuid::now_v7();
        let secret = smartfarm_core::credential::generate(smartfarm_core::credential::SecretKind::Device, id).unwrap();
        registry
            .apply(&RegistrySnapshot {
                version: 7,
                devices: vec![EdgeDevice {
                    device_id: id.to_string(),
                    name: "probe".into(),
                    kind: 1,
                    credential_sha256: secret.hash.clone(),
                }],
            })
            .unwrap();
        assert_eq!(registry.authenticate(&id.to_string(), &secret.secret), Ok(id));
        assert_eq!(registry.authenticate(&id.to_string(), "wrong"), Err(AuthFailure::BadCredential));
        assert_eq!(registry.authenticate("someone", &secret.secret), Err(AuthFailure::UnknownDevice));

        let reloaded = Registry::load(dir.path());
        assert_eq!(reloaded.version(), 7);
        assert_eq!(reloaded.authenticate(&id.to_string(), &secret.secret), Ok(id), "offline after a reboot");
    }
}
