//! Plant-disease diagnosis on the farm: an agent with no link to the cloud diagnoses a camera's photo with the
//! built-in model and announces the disease on `smartfarm/alerts` at once; when the cloud comes back serving a
//! new model version, the agent fetches that version's file and switches to it.

use std::path::Path;
use std::time::Duration;

use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, bootstrap_admin_key, run_smartfarm};
use smartfarm_ml::disease::{DEFAULT_MODEL, DiseaseClassifier};

fn black_rot_leaf() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/ml/fixtures/plants/Apple___Black_rot");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    files.sort();
    std::fs::read(&files[0]).unwrap()
}

#[tokio::test]
async fn an_offline_farm_diagnoses_its_photos_and_later_runs_the_model_the_cloud_serves() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "orchard", 1).await;
    let camera = fleet.register_camera(&cloud, &key, "row 3 camera").await;
    let camera_dir = data.data_dir.path().join("camera-3");
    let edge = Edge::start(&EdgeOptions {
        config: "camera_poll_interval = \"200ms\"\n".into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    })
    .await;
    edge.wait_for_registry(3).await;
    let cloud_addr = cloud.addr;
    // The link goes down: the farm is on its own.
    cloud.stop().await;

    let sensor = &fleet.sensors[0];
    let mut alerts = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &edge.mqtt.port().to_string(), "-V", "mqttv5"])
        .args(["-u", &sensor.device_id, "-P", &sensor.credential, "-t", "smartfarm/alerts", "-C", "1", "-W", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients) runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    smartfarm_edge::sim::drop_photos(&camera_dir, &[("leaf.jpg", &black_rot_leaf())]).unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), async {
        let mut stdout = String::new();
        tokio::io::AsyncReadExt::read_to_string(alerts.stdout.as_mut().unwrap(), &mut stdout).await.unwrap();
        stdout
    })
    .await
    .expect("an alert arrives on smartfarm/alerts");
    let alert: serde_json::Value = serde_json::from_str(output.trim()).expect("the alert is JSON");
    assert_eq!(alert["kind"], "disease_detected", "{alert}");
    assert_eq!(alert["label"], "Apple___Black_rot", "{alert}");
    assert_eq!(alert["device_id"], camera.as_str(), "{alert}");
    assert_eq!(alert["model"], "leafnet-plantvillage7@2026-12-05", "{alert}");
    assert!(alert["confidence"].as_f64().unwrap() >= 0.8, "{alert}");
    let _ = alerts.wait().await;

    // Meanwhile the cloud gets a new version of the model, made the serving one.
    let mut next = DiseaseClassifier::from_model_file(DEFAULT_MODEL, &smartfarm_ml::inference_device()).unwrap();
    let mut card = next.card().clone();
    card.version = "next".into();
    next.set_card(card).unwrap();
    let file = data.data_dir.path().join("next.safetensors");
    std::fs::write(&file, next.to_model_file().unwrap()).unwrap();
    let data_dir = data.data_dir.path().to_str().unwrap().to_string();
    let (ok, stdout, stderr) =
        run_smartfarm(&["model", "add", "--data-dir", &data_dir, "--file", file.to_str().unwrap(), "--activate"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"active\":true"), "{stdout}");

    // The link comes back: the agent is told the serving version, fetches it and switches.
    let cloud = Cloud::start(&data, CloudOptions { listen: Some(cloud_addr), ..Default::default() }).await;
    let next_in_use = "smartfarm_edge_model_info{name=\"leafnet-plantvillage7\",version=\"next\"}";
    let switched = eventually(Duration::from_secs(60), || async { edge.metric(next_in_use).await == 1.0 }).await;
    assert!(switched, "the agent runs the cloud's version; its log:\n{}", edge.log());
    let kept = data.data_dir.path().join("spool/models/plant_disease.safetensors");
    assert!(kept.exists(), "the pushed model is kept for restarts");
    edge.stop().await;
    cloud.stop().await;
}
