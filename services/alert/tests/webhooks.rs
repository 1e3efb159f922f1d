//! Webhook retries with several replicas: after a failed delivery the replica that tried holds the webhook's lease
//! through its wait before the next attempt, so no other replica tries meanwhile at a pace of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;
use uuid::Uuid;

use smartfarm_alert::AlertApi;
use smartfarm_bus::Bus;
use smartfarm_core::Principal;
use smartfarm_core::config::AlertsConfig;
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::AlertService;
use smartfarm_store::testing::TestDatabase;

mod common;

/// An endpoint that answers every request with a 500; returns its URL and how many requests it had.
async fn failing_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = vec![0; 64 * 1024];
                let _ = stream.read(&mut request).await;
                let answer = "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, requests)
}

#[tokio::test]
async fn a_failed_delivery_holds_the_lease_through_the_wait_before_the_next_attempt() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "orchard", SystemTime::now()).await.unwrap().id;
    // A lease lasts the attempt timeout and 5 s; the wait after a first failure is longer.
    let settings = AlertsConfig {
        webhook_timeout: Duration::from_millis(200),
        webhook_retry_min: Duration::from_secs(30),
        webhook_retry_max: Duration::from_secs(60),
        ..AlertsConfig::default()
    };
    let api = AlertApi::new(test.database.registry(), store.clone(), Bus::in_process(), settings);
    let (url, requests) = failing_endpoint().await;
    let mut create = Request::new(pb::CreateWebhookRequest { farm_id: farm_id.to_string(), url, min_severity: 0 });
    create.extensions_mut().insert(Principal::Admin { api_key_id: Uuid::now_v7() });
    let webhook = api.create_webhook(create).await.unwrap().into_inner().webhook.unwrap();
    let webhook_id = Uuid::parse_str(&webhook.id).unwrap();
    tokio::spawn(api.clone().run_webhooks());

    store.record_alert(&common::alert(farm_id, SystemTime::now())).await.unwrap();

    let mut failed = false;
    for _ in 0..200 {
        if store.get_webhook(webhook_id).await.unwrap().consecutive_failures >= 1 {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "the first delivery was tried and failed");
    // Past the lease the attempt took (timeout + 5 s), within the 30 s wait: nobody else may take the webhook.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let taken = store.lease_webhook(webhook_id, Uuid::now_v7(), Duration::from_secs(5)).await.unwrap();
    assert!(!taken, "another replica could take the webhook during the wait and try at once");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "one attempt so far");
}
