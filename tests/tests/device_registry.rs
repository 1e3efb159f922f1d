//! The device registry end to end: a real `smartfarm serve` process, real gRPC, on SQLite and on PostgreSQL.

use std::collections::HashMap;

use tonic::Code;

use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, DeviceClient, bootstrap_admin_key};
use smartfarm_proto::device::v1::{self as pb, DeviceKind, DeviceState};
use smartfarm_proto::pbjson_types::FieldMask;

fn register(farm_id: &str, name: &str, kind: DeviceKind) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        farm_id: farm_id.to_string(),
        name: name.to_string(),
        kind: kind as i32,
        labels: HashMap::new(),
    }
}

/// Creates a farm, which must succeed.
async fn create_farm(client: &mut DeviceClient, name: &str) -> pb::Farm {
    client.create_farm(pb::CreateFarmRequest { name: name.into() }).await.unwrap().into_inner().farm.unwrap()
}

/// Registers a device, which must succeed; returns it with its credential.
async fn register_device(
    client: &mut DeviceClient,
    farm_id: &str,
    name: &str,
    kind: DeviceKind,
) -> (pb::Device, String) {
    let response = client.register_device(register(farm_id, name, kind)).await.unwrap().into_inner();
    (response.device.unwrap(), response.credential)
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, message_part: &str) {
    match result {
        Ok(value) => panic!("expected {code:?} containing {message_part:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(message_part),
                "{:?} does not contain {message_part:?}",
                status.message()
            );
        }
    }
}

async fn registry_round_trip(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let mut admin = cloud.device_client(&bootstrap_admin_key(&data)).await;

    let farm = create_farm(&mut admin, "north farm").await;
    assert_eq!(farm.name, "north farm");
    let fetched =
        admin.get_farm(pb::GetFarmRequest { farm_id: farm.id.clone() }).await.unwrap().into_inner().farm.unwrap();
    assert_eq!(fetched, farm);
    assert_code(
        admin.create_farm(pb::CreateFarmRequest { name: "north farm".into() }).await,
        Code::AlreadyExists,
        "north farm",
    );

    let mut ids = Vec::new();
    for (name, kind) in [
        ("probe 1", DeviceKind::Sensor),
        ("probe 2", DeviceKind::Sensor),
        ("camera", DeviceKind::Camera),
        ("valve", DeviceKind::Actuator),
        ("gateway", DeviceKind::Gateway),
    ] {
        let mut request = register(&farm.id, name, kind);
        request.labels.insert("greenhouse".into(), "north".into());
        let response = admin.register_device(request).await.unwrap().into_inner();
        let device = response.device.unwrap();
        assert_eq!(device.kind, kind as i32);
        assert_eq!(device.state, DeviceState::Provisioned as i32);
        assert_eq!(device.farm_id, farm.id);
        assert!(device.last_seen_time.is_none());
        assert!(response.credential.starts_with("sfd_"), "a credential is returned once");
        ids.push(device.id);
    }
    assert_code(
        admin.register_device(register(&farm.id, "camera", DeviceKind::Camera)).await,
        Code::AlreadyExists,
        "camera",
    );

    // Paging: 5 devices, 2 per page, every device exactly once, in registration order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_devices(pb::ListDevicesRequest {
                farm_id: farm.id.clone(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.devices.len() <= 2);
        seen.extend(page.devices.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);

    let sensors = admin
        .list_devices(pb::ListDevicesRequest {
            farm_id: farm.id.clone(),
            kind: DeviceKind::Sensor as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sensors.devices.len(), 2);

    let updated = admin
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                id: ids[0].clone(),
                name: "probe one".into(),
                labels: HashMap::from([("row".to_string(), "3".to_string())]),
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths: vec!["name".into(), "labels".into()] }),
        })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(updated.name, "probe one");
    assert_eq!(updated.labels, HashMap::from([("row".to_string(), "3".to_string())]));

    let rotated = admin
        .rotate_device_credential(pb::RotateDeviceCredentialRequest { device_id: ids[4].clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.credential.starts_with("sfd_"));

    let gone = admin
        .decommission_device(pb::DecommissionDeviceRequest { device_id: ids[3].clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(gone.state, DeviceState::Decommissioned as i32);
    let again = admin
        .decommission_device(pb::DecommissionDeviceRequest { device_id: ids[3].clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(again, gone, "decommissioning twice returns the device unchanged");
    assert_code(
        admin.rotate_device_credential(pb::RotateDeviceCredentialRequest { device_id: ids[3].clone() }).await,
        Code::FailedPrecondition,
        "decommissioned",
    );
    let decommissioned = admin
        .list_devices(pb::ListDevicesRequest {
            farm_id: farm.id.clone(),
            state: DeviceState::Decommissioned as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decommissioned.devices, vec![gone]);
    assert_code(
        admin.get_device(pb::GetDeviceRequest { device_id: uuid::Uuid::now_v7().to_string() }).await,
        Code::NotFound,
        "not found",
    );
    cloud.stop().await;
}

async fn api_keys_isolate_farms(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let admin_key = bootstrap_admin_key(&data);
    let mut admin = cloud.device_client(&admin_key).await;

    let farm_a = create_farm(&mut admin, "farm a").await;
    let farm_b = create_farm(&mut admin, "farm b").await;
    let device_b = register_device(&mut admin, &farm_b.id, "probe", DeviceKind::Sensor).await.0;
    let (gateway_a, gateway_a_credential) =
        register_device(&mut admin, &farm_a.id, "gateway", DeviceKind::Gateway).await;
    let (_, sensor_a_credential) = register_device(&mut admin, &farm_a.id, "probe", DeviceKind::Sensor).await;
    let key_a = admin
        .create_api_key(pb::CreateApiKeyRequest { name: "farm a dashboard".into(), farm_id: farm_a.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key_a.api_key.as_ref().unwrap().farm_id, farm_a.id);
    let key_b = admin
        .create_api_key(pb::CreateApiKeyRequest { name: "farm b dashboard".into(), farm_id: farm_b.id.clone() })
        .await
        .unwrap()
        .into_inner();

    let mut as_a = cloud.device_client(&key_a.secret).await;
    // Its own farm works.
    as_a.get_farm(pb::GetFarmRequest { farm_id: farm_a.id.clone() }).await.unwrap();
    let own = as_a
        .register_device(register(&farm_a.id, "probe 2", DeviceKind::Sensor))
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    let listed = as_a.list_devices(pb::ListDevicesRequest::default()).await.unwrap().into_inner();
    assert!(listed.devices.iter().all(|d| d.farm_id == farm_a.id), "a farm key lists only its farm: {listed:?}");
    assert_eq!(listed.devices.len(), 3);
    let farms = as_a.list_farms(pb::ListFarmsRequest::default()).await.unwrap().into_inner();
    assert_eq!(farms.farms.iter().map(|f| f.id.clone()).collect::<Vec<_>>(), vec![farm_a.id.clone()]);
    // Only admins mint keys, even for the caller's own farm: a leaked farm key must not outlive its revocation. A
    // gateway's credential is such a key (it opens the farm's edge link).
    assert_code(
        as_a.register_device(register(&farm_a.id, "gateway 2", DeviceKind::Gateway)).await,
        Code::PermissionDenied,
        "only admin keys register gateways",
    );
    assert_code(
        as_a.rotate_device_credential(pb::RotateDeviceCredentialRequest { device_id: gateway_a.id.clone() }).await,
        Code::PermissionDenied,
        "only admin keys register gateways or rotate their credentials",
    );
    as_a.rotate_device_credential(pb::RotateDeviceCredentialRequest { device_id: own.id.clone() }).await.unwrap();
    assert_code(
        as_a.create_api_key(pb::CreateApiKeyRequest { name: "second a key".into(), farm_id: farm_a.id.clone() }).await,
        Code::PermissionDenied,
        "admin",
    );
    let own_keys = as_a.list_api_keys(pb::ListApiKeysRequest::default()).await.unwrap().into_inner().api_keys;
    assert_eq!(own_keys.iter().map(|k| k.farm_id.as_str()).collect::<Vec<_>>(), vec![farm_a.id.as_str()]);

    // Everything of farm b, and admin-only calls, are denied.
    let denied = "another farm";
    assert_code(as_a.get_farm(pb::GetFarmRequest { farm_id: farm_b.id.clone() }).await, Code::PermissionDenied, denied);
    assert_code(
        as_a.get_device(pb::GetDeviceRequest { device_id: device_b.id.clone() }).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.register_device(register(&farm_b.id, "intruder", DeviceKind::Sensor)).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.list_devices(pb::ListDevicesRequest { farm_id: farm_b.id.clone(), ..Default::default() }).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device { id: device_b.id.clone(), name: "mine now".into(), ..Default::default() }),
            update_mask: Some(FieldMask { paths: vec!["name".into()] }),
        })
        .await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.decommission_device(pb::DecommissionDeviceRequest { device_id: device_b.id.clone() }).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.rotate_device_credential(pb::RotateDeviceCredentialRequest { device_id: device_b.id.clone() }).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.create_api_key(pb::CreateApiKeyRequest { name: "b key".into(), farm_id: farm_b.id.clone() }).await,
        Code::PermissionDenied,
        "admin",
    );
    assert_code(
        as_a.revoke_api_key(pb::RevokeApiKeyRequest { api_key_id: key_b.api_key.unwrap().id }).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.list_api_keys(pb::ListApiKeysRequest { farm_id: farm_b.id.clone(), ..Default::default() }).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        as_a.create_farm(pb::CreateFarmRequest { name: "farm c".into() }).await,
        Code::PermissionDenied,
        "admin",
    );
    assert_code(
        as_a.create_api_key(pb::CreateApiKeyRequest { name: "root".into(), farm_id: String::new() }).await,
        Code::PermissionDenied,
        "admin",
    );
    let b_after = admin
        .get_device(pb::GetDeviceRequest { device_id: device_b.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(b_after, device_b, "nothing of farm b changed");

    // Device credentials are not API keys: a gateway's is refused on the registry, a sensor's everywhere.
    let mut as_gateway = cloud.device_client(&gateway_a_credential).await;
    assert_code(
        as_gateway.get_farm(pb::GetFarmRequest { farm_id: farm_a.id.clone() }).await,
        Code::PermissionDenied,
        "api key",
    );
    // ...but the gateway did authenticate, so it counts as seen.
    let gateway_id = gateway_a.id.clone();
    let seen = admin
        .get_device(pb::GetDeviceRequest { device_id: gateway_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(seen.state, DeviceState::Active as i32);
    assert!(seen.last_seen_time.is_some());
    let mut as_sensor = cloud.device_client(&sensor_a_credential).await;
    assert_code(
        as_sensor.get_farm(pb::GetFarmRequest { farm_id: farm_a.id.clone() }).await,
        Code::PermissionDenied,
        "gateway",
    );

    // Missing, malformed, wrong and revoked credentials.
    let mut anonymous =
        smartfarm_proto::device::v1::device_service_client::DeviceServiceClient::new(cloud.channel().await);
    assert_code(
        anonymous.list_farms(pb::ListFarmsRequest::default()).await,
        Code::Unauthenticated,
        "missing credentials",
    );
    let mut garbage = cloud.device_client("not-a-key").await;
    assert_code(garbage.list_farms(pb::ListFarmsRequest::default()).await, Code::Unauthenticated, "malformed");
    let forged = format!("{}{}", &key_a.secret[..key_a.secret.len() - 4], "AAAA");
    let mut forged = cloud.device_client(&forged).await;
    assert_code(forged.list_farms(pb::ListFarmsRequest::default()).await, Code::Unauthenticated, "invalid or revoked");

    let revoked = admin
        .revoke_api_key(pb::RevokeApiKeyRequest { api_key_id: key_a.api_key.as_ref().unwrap().id.clone() })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!(revoked.revoke_time.is_some());
    assert_code(
        as_a.get_device(pb::GetDeviceRequest { device_id: own.id.clone() }).await,
        Code::Unauthenticated,
        "invalid or revoked",
    );

    admin.decommission_device(pb::DecommissionDeviceRequest { device_id: gateway_id }).await.unwrap();
    assert_code(
        as_gateway.get_farm(pb::GetFarmRequest { farm_id: farm_a.id.clone() }).await,
        Code::Unauthenticated,
        "invalid or revoked",
    );
    cloud.stop().await;
}

async fn bad_input_names_the_field(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let mut admin = cloud.device_client(&bootstrap_admin_key(&data)).await;
    let farm = create_farm(&mut admin, "kilo").await;
    let device = register_device(&mut admin, &farm.id, "probe", DeviceKind::Sensor).await.0;

    let invalid = Code::InvalidArgument;
    assert_code(admin.create_farm(pb::CreateFarmRequest { name: "".into() }).await, invalid, "name: must not be empty");
    assert_code(
        admin.create_farm(pb::CreateFarmRequest { name: "   ".into() }).await,
        invalid,
        "name: must not be empty",
    );
    assert_code(
        admin.create_farm(pb::CreateFarmRequest { name: "x".repeat(201) }).await,
        invalid,
        "name: must be at most 200",
    );
    assert_code(
        admin.create_farm(pb::CreateFarmRequest { name: "y".repeat(100_000) }).await,
        invalid,
        "name: must be at most 200",
    );
    assert_code(
        admin.register_device(register(&farm.id, "", DeviceKind::Sensor)).await,
        invalid,
        "name: must not be empty",
    );
    assert_code(
        admin.register_device(register(&farm.id, "probe 9", DeviceKind::Unspecified)).await,
        invalid,
        "kind: is required",
    );
    let mut unknown_kind = register(&farm.id, "probe 9", DeviceKind::Sensor);
    unknown_kind.kind = 99;
    assert_code(admin.register_device(unknown_kind).await, invalid, "kind: 99 is not a known device kind");
    assert_code(
        admin.register_device(register("farm-1", "probe 9", DeviceKind::Sensor)).await,
        invalid,
        "farm_id: must be a UUID",
    );
    assert_code(
        admin.register_device(register("", "probe 9", DeviceKind::Sensor)).await,
        invalid,
        "farm_id: is required",
    );
    assert_code(
        admin.register_device(register(&uuid::Uuid::now_v7().to_string(), "probe 9", DeviceKind::Sensor)).await,
        Code::NotFound,
        "farm",
    );
    let mut bad_labels = register(&farm.id, "probe 9", DeviceKind::Sensor);
    bad_labels.labels.insert("Not Lowercase".into(), "x".into());
    assert_code(admin.register_device(bad_labels).await, invalid, "labels: label key");
    assert_code(
        admin.get_device(pb::GetDeviceRequest { device_id: "'; DROP TABLE devices; --".into() }).await,
        invalid,
        "device_id: must be a UUID",
    );
    assert_code(
        admin.get_farm(pb::GetFarmRequest { farm_id: "0".repeat(10_000) }).await,
        invalid,
        "farm_id: must be a UUID",
    );

    // Page sizes: a million is lowered to the maximum (AIP-158), negative is an error, tokens are checked.
    let huge = admin
        .list_devices(pb::ListDevicesRequest { farm_id: farm.id.clone(), page_size: 1_000_000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(huge.devices.len(), 1);
    assert!(huge.next_page_token.is_empty());
    assert_code(
        admin.list_devices(pb::ListDevicesRequest { page_size: -1, ..Default::default() }).await,
        invalid,
        "page_size: must not be negative",
    );
    assert_code(
        admin.list_devices(pb::ListDevicesRequest { page_token: "bm90IGEgdG9rZW4".into(), ..Default::default() }).await,
        invalid,
        "page_token",
    );
    admin.register_device(register(&farm.id, "probe 2", DeviceKind::Sensor)).await.unwrap();
    let first = admin
        .list_devices(pb::ListDevicesRequest { farm_id: farm.id.clone(), page_size: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    assert_code(
        admin
            .list_devices(pb::ListDevicesRequest {
                farm_id: farm.id.clone(),
                kind: DeviceKind::Camera as i32,
                page_size: 1,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            })
            .await,
        invalid,
        "page_token: was issued for different filters",
    );

    // UpdateDevice needs a mask of updatable fields.
    let rename = |paths: Vec<&str>| pb::UpdateDeviceRequest {
        device: Some(pb::Device { id: device.id.clone(), name: "renamed".into(), ..Default::default() }),
        update_mask: Some(FieldMask { paths: paths.into_iter().map(String::from).collect() }),
    };
    assert_code(admin.update_device(rename(vec![])).await, invalid, "update_mask: is required");
    assert_code(admin.update_device(rename(vec!["kind"])).await, invalid, "update_mask: \"kind\" cannot be updated");
    assert_code(admin.update_device(pb::UpdateDeviceRequest::default()).await, invalid, "device: is required");
    assert_code(
        admin.create_api_key(pb::CreateApiKeyRequest { name: "k".into(), farm_id: "nope".into() }).await,
        invalid,
        "farm_id: must be a UUID",
    );

    // After all that, the server is still up and unchanged.
    let still = admin
        .get_device(pb::GetDeviceRequest { device_id: device.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(still, device);
    cloud.stop().await;
}

async fn registry_survives_a_restart(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let admin_key = bootstrap_admin_key(&data);
    let mut admin = cloud.device_client(&admin_key).await;
    let farm = create_farm(&mut admin, "lima").await;
    let device = register_device(&mut admin, &farm.id, "probe", DeviceKind::Sensor).await.0;
    let farm_key = admin
        .create_api_key(pb::CreateApiKeyRequest { name: "lima key".into(), farm_id: farm.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .secret;
    cloud.stop().await;

    let restarted = Cloud::start(&data, CloudOptions::default()).await;
    assert_eq!(bootstrap_admin_key(&data), admin_key, "a second start makes no new bootstrap key");
    let mut admin = restarted.device_client(&admin_key).await;
    let after = admin
        .get_device(pb::GetDeviceRequest { device_id: device.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(after, device);
    let mut as_farm = restarted.device_client(&farm_key).await;
    let farms = as_farm.list_farms(pb::ListFarmsRequest::default()).await.unwrap().into_inner().farms;
    assert_eq!(farms, vec![farm]);
    restarted.stop().await;
}

macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(smartfarm_e2e::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(smartfarm_e2e::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_every_backend!(registry_round_trip, api_keys_isolate_farms, bad_input_names_the_field, registry_survives_a_restart);
