//! The behaviour every [`ModelStore`] backend must have, written once and run on SQLite and PostgreSQL.

use std::time::{Duration, SystemTime};

use smartfarm_core::Error;
use smartfarm_core::time::from_unix_micros;
use smartfarm_store::Database;
use smartfarm_store::models::{ModelInserted, StoredModel, model_blob_key};
use smartfarm_store::testing::TestDatabase as Harness;

fn at(seconds: u64) -> SystemTime {
    from_unix_micros(1_780_012_800_000_000) + Duration::from_secs(seconds)
}

fn model(name: &str, version: &str, kind: &str, byte: u8, created: u64) -> StoredModel {
    let sha256 = format!("{byte:02x}").repeat(32);
    StoredModel {
        name: name.into(),
        version: version.into(),
        kind: kind.into(),
        blob_key: model_blob_key(&sha256),
        sha256,
        size_bytes: 1000 + u64::from(byte),
        card: format!("{{\"name\":\"{name}\"}}"),
        create_time: at(created),
        activate_time: None,
    }
}

async fn versions_are_stored_once_and_listed_newest_first(database: &Database) {
    let models = database.models();
    let v1 = model("leafnet", "1", "plant_disease", 1, 10);
    assert_eq!(models.insert_model(v1.clone()).await.unwrap(), ModelInserted::Created(v1.clone()));
    assert_eq!(models.insert_model(v1.clone()).await.unwrap(), ModelInserted::Existing(v1.clone()));
    let other_bytes = model("leafnet", "1", "plant_disease", 9, 11);
    assert!(matches!(models.insert_model(other_bytes).await, Err(Error::AlreadyExists(_))));
    let v2 = model("leafnet", "2", "plant_disease", 2, 20);
    models.insert_model(v2.clone()).await.unwrap();
    let detector = model("window-autoencoder", "1", "sensor_anomaly", 3, 5);
    models.insert_model(detector.clone()).await.unwrap();

    assert_eq!(models.get_model("leafnet", "2").await.unwrap(), v2);
    assert!(matches!(models.get_model("leafnet", "3").await, Err(Error::NotFound { .. })));
    let all = models.list_models(None, None).await.unwrap();
    assert_eq!(all, vec![v2.clone(), v1.clone(), detector.clone()]);
    assert_eq!(models.list_models(Some("sensor_anomaly"), None).await.unwrap(), vec![detector]);
    assert_eq!(models.list_models(None, Some("leafnet")).await.unwrap(), vec![v2, v1]);
}

async fn one_version_per_model_serves_and_rollback_is_an_activation(database: &Database) {
    let models = database.models();
    for (version, byte, created) in [("1", 1, 10), ("2", 2, 20)] {
        models.insert_model(model("leafnet", version, "plant_disease", byte, created)).await.unwrap();
    }
    models.insert_model(model("mobilenet", "upstream", "plant_disease", 3, 30)).await.unwrap();
    assert_eq!(models.active_model("plant_disease").await.unwrap(), None);

    let active = models.activate_model("leafnet", "2", at(100)).await.unwrap();
    assert_eq!((active.version.as_str(), active.activate_time), ("2", Some(at(100))));
    assert_eq!(models.active_model("plant_disease").await.unwrap().unwrap().version, "2");
    // Rolling back is activating the older version: the newer one stops serving.
    models.activate_model("leafnet", "1", at(200)).await.unwrap();
    assert_eq!(models.get_model("leafnet", "2").await.unwrap().activate_time, None);
    assert_eq!(models.active_model("plant_disease").await.unwrap().unwrap().version, "1");
    // Another model of the kind, activated later, is the kind's serving model; each name keeps its own.
    models.activate_model("mobilenet", "upstream", at(300)).await.unwrap();
    assert_eq!(models.active_model("plant_disease").await.unwrap().unwrap().name, "mobilenet");
    assert_eq!(models.get_model("leafnet", "1").await.unwrap().activate_time, Some(at(200)));
    assert!(matches!(models.activate_model("leafnet", "9", at(400)).await, Err(Error::NotFound { .. })));
    // Activated through a replica whose clock is behind: still the latest activation, so it serves.
    let behind = models.activate_model("leafnet", "2", at(250)).await.unwrap();
    assert!(behind.activate_time.unwrap() > at(300), "{:?}", behind.activate_time);
    assert_eq!(models.active_model("plant_disease").await.unwrap().unwrap().name, "leafnet");
    assert_eq!(models.active_model("sensor_anomaly").await.unwrap(), None);
}

macro_rules! model_suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn versions_are_stored_once_and_listed_newest_first() {
                super::versions_are_stored_once_and_listed_newest_first(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn one_version_per_model_serves_and_rollback_is_an_activation() {
                super::one_version_per_model_serves_and_rollback_is_an_activation(&Harness::$backend().await.database)
                    .await;
            }
        }
    };
}

model_suite!(sqlite);
model_suite!(postgres);
