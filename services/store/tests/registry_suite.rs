//! The behaviour every [`RegistryStore`] backend must have, written once and run on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use smartfarm_core::Error;
use smartfarm_core::time::now;
use smartfarm_store::RegistryStore;
use smartfarm_store::model::{ApiKey, DeviceFilter, DeviceKind, DeviceState, DeviceUpdate, KeysetPage, NewDevice};
use smartfarm_store::testing::TestDatabase as Harness;
use uuid::Uuid;

fn page(limit: usize) -> KeysetPage {
    KeysetPage { after: None, limit }
}

fn new_device(farm_id: Uuid, name: &str, kind: DeviceKind) -> NewDevice {
    NewDevice {
        id: Uuid::now_v7(),
        farm_id,
        name: name.to_string(),
        kind,
        labels: BTreeMap::from([("row".to_string(), "7".to_string())]),
        credential_sha256: "ab".repeat(32),
        create_time: now(),
    }
}

fn api_key(farm_id: Option<Uuid>) -> ApiKey {
    ApiKey {
        id: Uuid::now_v7(),
        name: "test key".to_string(),
        farm_id,
        secret_sha256: "cd".repeat(32),
        create_time: now(),
        revoke_time: None,
    }
}

async fn farms_are_unique_and_paged(store: &dyn RegistryStore) {
    let a = store.create_farm(Uuid::now_v7(), "alpha", now()).await.unwrap();
    let b = store.create_farm(Uuid::now_v7(), "bravo", now()).await.unwrap();
    let c = store.create_farm(Uuid::now_v7(), "charlie", now()).await.unwrap();
    assert_eq!(store.get_farm(b.id).await.unwrap(), b);

    let duplicate = store.create_farm(Uuid::now_v7(), "alpha", now()).await.unwrap_err();
    assert!(matches!(duplicate, Error::AlreadyExists(_)), "{duplicate:?}");
    assert!(matches!(store.get_farm(Uuid::now_v7()).await, Err(Error::NotFound { .. })));

    let first = store.list_farms(None, page(2)).await.unwrap();
    assert_eq!(first.iter().map(|f| f.id).collect::<Vec<_>>(), vec![a.id, b.id]);
    let rest = store.list_farms(None, KeysetPage { after: Some(b.id), limit: 2 }).await.unwrap();
    assert_eq!(rest.iter().map(|f| f.id).collect::<Vec<_>>(), vec![c.id]);
    let only = store.list_farms(Some(c.id), page(10)).await.unwrap();
    assert_eq!(only, vec![c]);
}

async fn devices_register_list_and_filter(store: &dyn RegistryStore) {
    let farm = store.create_farm(Uuid::now_v7(), "delta", now()).await.unwrap();
    let other = store.create_farm(Uuid::now_v7(), "echo", now()).await.unwrap();

    let missing_farm = store.create_device(new_device(Uuid::now_v7(), "probe", DeviceKind::Sensor)).await.unwrap_err();
    assert!(matches!(missing_farm, Error::NotFound { resource: "farm", .. }), "{missing_farm:?}");

    let probe = store.create_device(new_device(farm.id, "probe", DeviceKind::Sensor)).await.unwrap();
    assert_eq!(probe.state, DeviceState::Provisioned);
    assert_eq!(probe.labels.get("row").map(String::as_str), Some("7"));
    assert_eq!(probe.last_seen_time, None);
    assert_eq!(store.get_device(probe.id).await.unwrap(), probe);

    let duplicate = store.create_device(new_device(farm.id, "probe", DeviceKind::Camera)).await.unwrap_err();
    assert!(matches!(duplicate, Error::AlreadyExists(_)), "{duplicate:?}");
    store.create_device(new_device(other.id, "probe", DeviceKind::Sensor)).await.unwrap();

    let camera = store.create_device(new_device(farm.id, "camera", DeviceKind::Camera)).await.unwrap();
    let gateway = store.create_device(new_device(farm.id, "gateway", DeviceKind::Gateway)).await.unwrap();
    assert!(matches!(store.get_device(Uuid::now_v7()).await, Err(Error::NotFound { resource: "device", .. })));

    let on_farm = DeviceFilter { farm_id: Some(farm.id), ..Default::default() };
    let all = store.list_devices(&on_farm, page(10)).await.unwrap();
    assert_eq!(all.iter().map(|d| d.id).collect::<Vec<_>>(), vec![probe.id, camera.id, gateway.id]);
    let paged = store.list_devices(&on_farm, KeysetPage { after: Some(probe.id), limit: 1 }).await.unwrap();
    assert_eq!(paged.iter().map(|d| d.id).collect::<Vec<_>>(), vec![camera.id]);

    let cameras = DeviceFilter { farm_id: Some(farm.id), kind: Some(DeviceKind::Camera), state: None };
    assert_eq!(store.list_devices(&cameras, page(10)).await.unwrap(), vec![camera.clone()]);
    let everywhere = store.list_devices(&DeviceFilter::default(), page(10)).await.unwrap();
    assert_eq!(everywhere.len(), 4);

    let version_before = store.get_farm(farm.id).await.unwrap().registry_version;
    assert_eq!(version_before, 3, "each registration bumps the farm's registry version");
}

async fn devices_update_decommission_and_rotate(store: &dyn RegistryStore) {
    let farm = store.create_farm(Uuid::now_v7(), "foxtrot", now()).await.unwrap();
    let probe = store.create_device(new_device(farm.id, "probe", DeviceKind::Sensor)).await.unwrap();
    let pump = store.create_device(new_device(farm.id, "pump", DeviceKind::Actuator)).await.unwrap();

    let later = now() + Duration::from_secs(5);
    let renamed = store
        .update_device(probe.id, DeviceUpdate { name: Some("probe 2".into()), labels: None }, later)
        .await
        .unwrap();
    assert_eq!(renamed.name, "probe 2");
    assert_eq!(renamed.labels, probe.labels, "labels untouched when not in the update");
    assert_eq!(renamed.update_time, later);
    let relabelled =
        store.update_device(probe.id, DeviceUpdate { name: None, labels: Some(BTreeMap::new()) }, later).await.unwrap();
    assert!(relabelled.labels.is_empty());
    assert_eq!(relabelled.name, "probe 2");

    let clash = store.update_device(probe.id, DeviceUpdate { name: Some("pump".into()), labels: None }, later).await;
    assert!(matches!(clash, Err(Error::AlreadyExists(_))), "{clash:?}");

    let rotated = store.set_device_credential(pump.id, &"ef".repeat(32), later).await.unwrap();
    assert_eq!(rotated.credential_sha256.as_deref(), Some("ef".repeat(32).as_str()));

    let gone = store.decommission_device(pump.id, later).await.unwrap();
    assert_eq!(gone.state, DeviceState::Decommissioned);
    assert_eq!(gone.credential_sha256, None);
    let again = store.decommission_device(pump.id, later + Duration::from_secs(1)).await.unwrap();
    assert_eq!(again, gone, "decommissioning twice changes nothing");

    let frozen = store.update_device(pump.id, DeviceUpdate { name: Some("x".into()), labels: None }, later).await;
    assert!(matches!(frozen, Err(Error::FailedPrecondition(_))), "{frozen:?}");
    let no_credential = store.set_device_credential(pump.id, &"ef".repeat(32), later).await;
    assert!(matches!(no_credential, Err(Error::FailedPrecondition(_))), "{no_credential:?}");

    // A replacement may take the decommissioned device's name.
    let replacement = store.create_device(new_device(farm.id, "pump", DeviceKind::Actuator)).await.unwrap();
    assert_ne!(replacement.id, pump.id);

    let decommissioned = DeviceFilter { farm_id: Some(farm.id), kind: None, state: Some(DeviceState::Decommissioned) };
    assert_eq!(store.list_devices(&decommissioned, page(10)).await.unwrap(), vec![gone]);
}

async fn last_seen_only_moves_forward(store: &dyn RegistryStore) {
    let farm = store.create_farm(Uuid::now_v7(), "golf", now()).await.unwrap();
    let probe = store.create_device(new_device(farm.id, "probe", DeviceKind::Sensor)).await.unwrap();
    let retired = store.create_device(new_device(farm.id, "retired", DeviceKind::Sensor)).await.unwrap();
    store.decommission_device(retired.id, now()).await.unwrap();

    let t1 = now() + Duration::from_secs(60);
    let t0 = t1 - Duration::from_secs(30);
    store.record_devices_seen(&[probe.id, retired.id, Uuid::now_v7()], t1).await.unwrap();
    let seen = store.get_device(probe.id).await.unwrap();
    assert_eq!(seen.state, DeviceState::Active);
    assert_eq!(seen.last_seen_time, Some(t1));

    store.record_devices_seen(&[probe.id], t0).await.unwrap();
    assert_eq!(store.get_device(probe.id).await.unwrap().last_seen_time, Some(t1), "an older time never wins");

    let retired = store.get_device(retired.id).await.unwrap();
    assert_eq!(retired.state, DeviceState::Decommissioned);
    assert_eq!(retired.last_seen_time, None);
}

async fn api_keys_are_scoped_listed_and_revoked(store: &dyn RegistryStore) {
    assert_eq!(store.count_api_keys().await.unwrap(), 0);
    let farm = store.create_farm(Uuid::now_v7(), "hotel", now()).await.unwrap();
    let admin = store.create_api_key(api_key(None)).await.unwrap();
    let scoped = store.create_api_key(api_key(Some(farm.id))).await.unwrap();
    assert_eq!(store.get_api_key(scoped.id).await.unwrap(), scoped);
    assert_eq!(store.count_api_keys().await.unwrap(), 2);

    let missing_farm = store.create_api_key(api_key(Some(Uuid::now_v7()))).await.unwrap_err();
    assert!(matches!(missing_farm, Error::NotFound { resource: "farm", .. }), "{missing_farm:?}");

    assert_eq!(store.list_api_keys(Some(farm.id), page(10)).await.unwrap(), vec![scoped.clone()]);
    assert_eq!(store.list_api_keys(None, page(10)).await.unwrap(), vec![admin.clone(), scoped.clone()]);
    let after = store.list_api_keys(None, KeysetPage { after: Some(admin.id), limit: 10 }).await.unwrap();
    assert_eq!(after, vec![scoped.clone()]);

    let revoke_time = now();
    let revoked = store.revoke_api_key(scoped.id, revoke_time).await.unwrap();
    assert_eq!(revoked.revoke_time, Some(revoke_time));
    let again = store.revoke_api_key(scoped.id, revoke_time + Duration::from_secs(9)).await.unwrap();
    assert_eq!(again.revoke_time, Some(revoke_time), "the first revocation time stays");
    assert!(matches!(store.revoke_api_key(Uuid::now_v7(), now()).await, Err(Error::NotFound { .. })));
    assert!(matches!(store.get_api_key(Uuid::now_v7()).await, Err(Error::NotFound { .. })));
}

async fn migrations_are_idempotent_and_data_survives_a_reopen(harness: &Harness) {
    let store = harness.registry();
    let farm = store
        .create_farm(Uuid::now_v7(), "india", SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456))
        .await
        .unwrap();
    let device = store.create_device(new_device(farm.id, "probe", DeviceKind::Sensor)).await.unwrap();
    let farm = store.get_farm(farm.id).await.unwrap();
    assert_eq!(farm.registry_version, 1);

    let reopened = harness.reopen().await;
    let report = reopened.migrate().await.unwrap();
    assert!(report.applied.is_empty(), "a migrated database needs nothing: {report:?}");
    assert_eq!(report.current_version, reopened.schema_version().await.unwrap());
    assert!(report.current_version >= 1);
    let registry = reopened.registry();
    assert_eq!(registry.get_farm(farm.id).await.unwrap(), farm);
    assert_eq!(registry.get_device(device.id).await.unwrap(), device);
}

macro_rules! registry_suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn farms_are_unique_and_paged() {
                let harness = Harness::$backend().await;
                super::farms_are_unique_and_paged(&*harness.registry()).await;
            }

            #[tokio::test]
            async fn devices_register_list_and_filter() {
                let harness = Harness::$backend().await;
                super::devices_register_list_and_filter(&*harness.registry()).await;
            }

            #[tokio::test]
            async fn devices_update_decommission_and_rotate() {
                let harness = Harness::$backend().await;
                super::devices_update_decommission_and_rotate(&*harness.registry()).await;
            }

            #[tokio::test]
            async fn last_seen_only_moves_forward() {
                let harness = Harness::$backend().await;
                super::last_seen_only_moves_forward(&*harness.registry()).await;
            }

            #[tokio::test]
            async fn api_keys_are_scoped_listed_and_revoked() {
                let harness = Harness::$backend().await;
                super::api_keys_are_scoped_listed_and_revoked(&*harness.registry()).await;
            }

            #[tokio::test]
            async fn migrations_are_idempotent_and_data_survives_a_reopen() {
                let harness = Harness::$backend().await;
                super::migrations_are_idempotent_and_data_survives_a_reopen(&harness).await;
            }
        }
    };
}

registry_suite!(sqlite);
registry_suite!(postgres);
