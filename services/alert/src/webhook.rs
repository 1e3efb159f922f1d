//! Webhooks: URLs that receive a farm's alert events as JSON POSTs signed with HMAC-SHA256 (header
//! `x-smartfarm-signature: sha256=<hex of HMAC(secret, "<timestamp>.<body>")>`, the timestamp in
//! `x-smartfarm-timestamp`). Each webhook has a cursor in the alert event log
//! (stored), so deliveries resume after a restart and none is skipped: a failed delivery is retried with exponential
//! backoff, forever, and after `webhook_max_failures` failures in a row the webhook is marked failing with its last
//! error (what `ListWebhooks` shows) until a delivery succeeds again. Delivery is at least once: a receiver
//! deduplicates on the `cursor` field.
//!
//! Across replicas each webhook has one deliverer at a time: a process delivers a webhook's events only while it
//! holds the webhook's lease in the database (renewed as it works, taken over by another replica once it runs out),
//! so replicas do not post the same event twice.
//!
//! URLs must be http or https and may not point at link-local addresses (cloud metadata services live there). The
//! client connects only to addresses it checked: its resolver refuses a name with any such address, at every
//! connection, so a name that resolves elsewhere when the webhook is made and there later (DNS rebinding) is refused
//! too, and no second lookup between the check and the connection can differ from the one checked.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::task::JoinHandle;
use uuid::Uuid;

use smartfarm_bus::{Bus, Event};
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::{Error, Result, time};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_store::AlertStore;
use smartfarm_store::alerts::{AlertEvent, DeliveryOutcome, Webhook, WebhookState};

/// The header that carries the body's signature.
pub const SIGNATURE_HEADER: &str = "x-smartfarm-signature";
/// Events delivered per read of the log.
const DELIVERY_PAGE: usize = 100;
/// How often the list of webhooks is read again (new and deleted ones).
const RELOAD: Duration = Duration::from_secs(2);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector<CheckedResolver>>, Full<Bytes>>;

/// A new signing secret: 32 random bytes, hex.
pub fn new_secret() -> Result<String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(|error| Error::internal("no randomness for a webhook secret", anyhow::anyhow!("{error}")))?;
    Ok(hex::encode(key))
}

/// The header that carries when the request was signed (Unix seconds); the signature covers it.
pub const TIMESTAMP_HEADER: &str = "x-smartfarm-timestamp";

/// `sha256=<hex>` of `<timestamp>.<body>` under a secret (the secret's text as the key): the value of
/// [`SIGNATURE_HEADER`]. The timestamp is signed so that a receiver can refuse a captured request replayed later
/// (one older than a few minutes), as Stripe's and Slack's schemes do; each attempt is signed anew.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    hmac_sha256_hex(secret, &[timestamp.to_string().as_bytes(), b".", body])
}

fn hmac_sha256_hex(secret: &str, parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How long a webhook host's name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an address is one a webhook may not reach: link-local (169.254.0.0/16, where cloud metadata services
/// answer, and fe80::/10), the metadata services outside it (Alibaba Cloud's 100.100.100.200, Azure's WireServer
/// 168.63.129.16, AWS's fd00:ec2::254, Oracle Cloud's fd00:c1::a9fe:a9fe), unspecified, or multicast/broadcast; an
/// IPv4 address mapped into IPv6 or behind the NAT64 prefix is judged as itself.
fn forbidden(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let alibaba_metadata = std::net::Ipv4Addr::new(100, 100, 100, 200);
            let azure_wireserver = std::net::Ipv4Addr::new(168, 63, 129, 16);
            v4.is_link_local()
                || v4 == alibaba_metadata
                || v4 == azure_wireserver
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            // 64:ff9b::/96, the well-known NAT64 prefix: the last 32 bits are an IPv4 address.
            let segments = v6.segments();
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return forbidden(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            // AWS's and Oracle Cloud's IPv6 metadata services are unique-local addresses, not link-local.
            let aws_metadata = std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
            let oracle_metadata = std::net::Ipv6Addr::new(0xfd00, 0xc1, 0, 0, 0, 0, 0xa9fe, 0xa9fe);
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == aws_metadata
                || v6 == oracle_metadata
                || v6.is_unspecified()
                || v6.is_multicast()
        }
    }
}

/// Checks a webhook URL: http(s), a host, no credentials, and no address a webhook may not reach. Returns it as
/// given.
pub async fn check_url(url: &str) -> Result<String> {
    let field = "url";
    if url.len() > 2048 {
        return Err(Error::invalid(field, "must be at most 2048 characters"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| Error::invalid(field, format!("{} is not a url", smartfarm_core::validate::excerpt(url))))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(Error::invalid(field, "must be an http:// or https:// url")),
    }
    let authority = uri.authority().ok_or_else(|| Error::invalid(field, "has no host"))?;
    if authority.as_str().contains('@') {
        return Err(Error::invalid(field, "must not carry credentials; the signature authenticates the sender"));
    }
    resolve_allowed(&uri).await.map_err(|reason| Error::invalid(field, reason))?;
    Ok(url.to_string())
}

/// Resolves a URL's host; refuses it when any address is one a webhook may not reach.
async fn resolve_allowed(uri: &http::Uri) -> std::result::Result<(), String> {
    let host = uri.host().ok_or("has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    match host.parse::<IpAddr>() {
        Ok(address) => allowed_addresses(&host, vec![SocketAddr::new(address, 0)]).map(drop),
        Err(_) => resolve_checked(&host).await.map(drop),
    }
}

/// The addresses of a host name, refused when the name is a metadata service's or any address is one a webhook may
/// not reach.
async fn resolve_checked(host: &str) -> std::result::Result<Vec<SocketAddr>, String> {
    allowed_addresses(host, Vec::new())?;
    // The system resolver's own timeouts can add up to much longer; a CreateWebhook call waits no more than this.
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| format!("cannot resolve {host} within {} s", RESOLVE_TIMEOUT.as_secs()))?;
    let addresses = lookup.map_err(|error| format!("cannot resolve {host}: {error}"))?.collect();
    allowed_addresses(host, addresses)
}

fn allowed_addresses(host: &str, addresses: Vec<SocketAddr>) -> std::result::Result<Vec<SocketAddr>, String> {
    if host.eq_ignore_ascii_case("metadata.google.internal") || host.eq_ignore_ascii_case("metadata") {
        return Err(format!("{host} is a cloud metadata service"));
    }
    match addresses.iter().find(|address| forbidden(address.ip())) {
        Some(address) => Err(format!(
            "points at {}, a link-local or reserved address (cloud metadata services live there)",
            address.ip()
        )),
        None => Ok(addresses),
    }
}

/// The webhook client's resolver: the connection goes only to addresses [`resolve_checked`] let through.
#[derive(Clone, Debug)]
struct CheckedResolver;

impl tower::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            resolve_checked(name.as_str())
                .await
                .map(Vec::into_iter)
                .map_err(|reason| std::io::Error::new(std::io::ErrorKind::PermissionDenied, reason))
        })
    }
}

/// A webhook as the contract's message (without its secret).
pub fn to_proto(webhook: &Webhook) -> pb::Webhook {
    pb::Webhook {
        id: webhook.id.to_string(),
        farm_id: webhook.farm_id.to_string(),
        url: webhook.url.clone(),
        min_severity: webhook.min_severity.to_proto(),
        state: match webhook.state {
            WebhookState::Healthy => pb::WebhookState::Healthy,
            WebhookState::Failing => pb::WebhookState::Failing,
        } as i32,
        consecutive_failures: webhook.consecutive_failures,
        last_error: webhook.last_error.clone().unwrap_or_default(),
        last_success_time: webhook.last_success_time.map(time::to_timestamp),
        create_time: Some(time::to_timestamp(webhook.create_time)),
    }
}

/// The JSON body of one delivery.
pub fn body(webhook: &Webhook, event: &AlertEvent) -> Vec<u8> {
    let message = serde_json::json!({
        "webhook_id": webhook.id.to_string(),
        "cursor": event.sequence.to_string(),
        "event_type": crate::subscribe::event_type(event.kind).as_str_name(),
        "alert": event.alert.to_proto(),
    });
    serde_json::to_vec(&message).expect("a JSON value serialises")
}

/// An error and its causes, joined: what `last_error` shows (a refused address reads "client error (Connect): dns
/// error: points at …").
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The webhook client: HTTP/1.1, or over TLS with public CA roots, connecting through [`CheckedResolver`].
fn client() -> HttpsClient {
    let mut http = HttpConnector::new_with_resolver(CheckedResolver);
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Runs one delivery task per webhook.
pub struct Dispatcher {
    /// This process, as a lease holder.
    owner: Uuid,
    alerts: Arc<dyn AlertStore>,
    bus: Bus,
    settings: AlertsConfig,
    client: HttpsClient,
}

impl Dispatcher {
    pub fn new(alerts: Arc<dyn AlertStore>, bus: Bus, settings: AlertsConfig) -> Dispatcher {
        Dispatcher { owner: Uuid::now_v7(), alerts, bus, settings, client: client() }
    }

    /// Keeps a delivery task per webhook (started for new ones, stopped for deleted ones), forever.
    pub async fn run(self) {
        let this = Arc::new(self);
        let mut workers: HashMap<Uuid, JoinHandle<()>> = HashMap::new();
        let mut reload = tokio::time::interval(RELOAD);
        loop {
            reload.tick().await;
            let webhooks = match this.all_webhooks().await {
                Ok(webhooks) => webhooks,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the webhooks; trying again");
                    continue;
                }
            };
            let ids: std::collections::HashSet<Uuid> = webhooks.iter().copied().collect();
            workers.retain(|id, worker| {
                let keep = ids.contains(id) && !worker.is_finished();
                if !keep {
                    worker.abort();
                }
                keep
            });
            for id in ids {
                workers.entry(id).or_insert_with(|| tokio::spawn(this.clone().deliver_forever(id)));
            }
        }
    }

    async fn all_webhooks(&self) -> Result<Vec<Uuid>> {
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let page = self.alerts.list_webhooks(None, after, 1000).await?;
            after = page.last().map(|webhook| webhook.id);
            let done = page.len() < 1000;
            ids.extend(page.into_iter().map(|webhook| webhook.id));
            if done {
                return Ok(ids);
            }
        }
    }

    /// How long a lease lasts: beyond one attempt (it is renewed before each), so it does not run out while this
    /// process posts; short, so a replica that stopped hands over soon.
    fn lease(&self) -> Duration {
        self.settings.webhook_timeout + Duration::from_secs(5)
    }

    /// The wait before the next attempt after `failures` failed in a row: `webhook_retry_min`, doubling with each
    /// failure, at most `webhook_retry_max`. It follows from the stored failure count, so whichever replica delivers
    /// next keeps the same pace.
    fn retry_delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.settings.webhook_retry_min.saturating_mul(1 << doublings).min(self.settings.webhook_retry_max)
    }

    /// Delivers one webhook's events in order, while this process holds its lease, until it is deleted.
    async fn deliver_forever(self: Arc<Self>, id: Uuid) {
        let mut changes = self.bus.subscribe();
        // For the store's own failures (it is read again after this).
        let backoff = self.settings.webhook_retry_min;
        loop {
            match self.alerts.lease_webhook(id, self.owner, self.lease()).await {
                Ok(true) => {}
                Ok(false) => {
                    // Another replica delivers it; look again in a while (it may go away).
                    tokio::time::sleep(self.lease() / 3).await;
                    continue;
                }
                Err(Error::NotFound { .. }) => return,
                Err(error) => {
                    tracing::warn!(webhook_id = %id, %error, "cannot lease the webhook; trying again");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
            let webhook = match self.alerts.get_webhook(id).await {
                Ok(webhook) => webhook,
                Err(Error::NotFound { .. }) => return,
                Err(error) => {
                    tracing::warn!(webhook_id = %id, %error, "cannot read the webhook; trying again");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let events = match self
                .alerts
                .alert_events_after(
                    webhook.delivered_sequence,
                    Some(webhook.farm_id),
                    webhook.min_severity,
                    DELIVERY_PAGE,
                )
                .await
            {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(webhook_id = %id, %error, "cannot read the alert log; trying again");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            if events.is_empty() {
                // Wait for news (any alert change), or a second.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        match changes.recv().await {
                            Ok(Event::AlertChanged(changed)) if changed.alert.farm_id == webhook.farm_id => return,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                return std::future::pending::<()>().await;
                            }
                            _ => {}
                        }
                    }
                })
                .await;
                continue;
            }
            let mut webhook = webhook;
            for event in events {
                // Renewed before every post, so the lease never runs out while this process delivers, and the
                // moment another replica holds it this one stops.
                match self.alerts.lease_webhook(id, self.owner, self.lease()).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(Error::NotFound { .. }) => return,
                    Err(error) => {
                        tracing::warn!(webhook_id = %id, %error, "cannot renew the webhook's lease");
                        break;
                    }
                }
                match self.deliver(&webhook, &event).await {
                    Ok(()) => {
                        metrics::counter!("smartfarm_webhook_deliveries_total", "outcome" => "delivered").increment(1);
                        let outcome = DeliveryOutcome::Delivered { sequence: event.sequence, at: time::now() };
                        match self.alerts.record_delivery(id, &outcome).await {
                            Ok(updated) => webhook = updated,
                            Err(Error::NotFound { .. }) => return,
                            Err(error) => {
                                // Delivered but not recorded: it will be delivered again (receivers dedupe on cursor),
                                // after a wait, as for the store's other failures: not at once, again and again,
                                // while the database does not take the record.
                                tracing::warn!(webhook_id = %id, %error, "cannot record a delivery");
                                tokio::time::sleep(backoff).await;
                                break;
                            }
                        }
                    }
                    Err(error) => {
                        metrics::counter!("smartfarm_webhook_deliveries_total", "outcome" => "failed").increment(1);
                        let failures = webhook.consecutive_failures + 1;
                        let mark_failing = failures >= self.settings.webhook_max_failures;
                        let wait = self.retry_delay(failures);
                        // The host only: a chat webhook's path is its secret.
                        let host = webhook.url.parse::<http::Uri>().ok().and_then(|uri| uri.host().map(str::to_string));
                        tracing::warn!(webhook_id = %id, host = host.as_deref().unwrap_or("?"), failures, %error, retry_in_ms = wait.as_millis() as u64, "webhook delivery failed");
                        let outcome = DeliveryOutcome::Failed { error, mark_failing };
                        match self.alerts.record_delivery(id, &outcome).await {
                            Ok(_) => {}
                            Err(Error::NotFound { .. }) => return,
                            // The event is tried again after the wait all the same (the cursor did not move); only
                            // the failure count and its visibility in ListWebhooks lag behind.
                            Err(error) => {
                                tracing::error!(webhook_id = %id, %error, "cannot record a failed webhook delivery")
                            }
                        }
                        // The lease covers the wait, so no other replica tries meanwhile (with a pace of its own);
                        // should this one stop, another takes over a lease after the wait.
                        if let Err(error) = self.alerts.lease_webhook(id, self.owner, wait + self.lease()).await {
                            tracing::warn!(webhook_id = %id, %error, "cannot hold the webhook's lease through the wait");
                        }
                        tokio::time::sleep(wait).await;
                        break;
                    }
                }
            }
        }
    }

    /// One attempt: POST the signed body; a 2xx answer is a delivery.
    async fn deliver(&self, webhook: &Webhook, event: &AlertEvent) -> std::result::Result<(), String> {
        let uri: http::Uri = webhook.url.parse().map_err(|_| "the url does not parse".to_string())?;
        // Names are checked by the client's resolver as it connects; literal addresses never reach it.
        let host = uri.host().ok_or("has no host")?.trim_start_matches('[').trim_end_matches(']');
        if let Ok(address) = host.parse::<IpAddr>() {
            allowed_addresses(host, vec![SocketAddr::new(address, 0)])?;
        }
        let body = body(webhook, event);
        let timestamp = time::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let request = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("smartfarm/", env!("CARGO_PKG_VERSION")))
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature(&webhook.secret, timestamp, &body))
            .header("x-smartfarm-event", crate::subscribe::event_type(event.kind).as_str_name())
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| format!("cannot build the request: {error}"))?;
        let response = tokio::time::timeout(self.settings.webhook_timeout, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {:?}", self.settings.webhook_timeout))?
            .map_err(|error| format!("request failed: {}", causes(&error)))?;
        let status = response.status();
        if status.is_success() { Ok(()) } else { Err(format!("the endpoint answered {status}")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_and_the_body() {
        // RFC 4231 test case 2, its data given in parts.
        let signed = hmac_sha256_hex("Jefe", &[b"what do ya ", b"want for nothing?"]);
        assert_eq!(signed, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_eq!(signature("key", 1700000000, b"{}"), hmac_sha256_hex("key", &[b"1700000000.{}"]));
        assert_ne!(signature("key", 1700000000, b"{}"), signature("key", 1700000001, b"{}"), "the time is signed");
    }

    #[tokio::test]
    async fn urls_that_are_not_http_or_point_at_link_local_addresses_are_refused() {
        for bad in [
            "ftp://example.com/hook",
            "not a url",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/hook",
            "http://[fd00:ec2::254]/latest/meta-data",
            "http://100.100.100.200/latest/meta-data",
            "http://168.63.129.16/machine",
            "http://[fd00:c1::a9fe:a9fe]/opc/v2/instance",
            "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
            "http://[::ffff:169.254.169.254]/latest/meta-data",
            "http://metadata.google.internal/computeMetadata/v1",
            "http://user:pass@127.0.0.1/hook",
            "http://0.0.0.0/hook",
        ] {
            let refusal = check_url(bad).await.unwrap_err().to_string();
            assert!(refusal.starts_with("url:"), "{bad}: {refusal}");
        }
        assert_eq!(check_url("http://127.0.0.1:8080/hook").await.unwrap(), "http://127.0.0.1:8080/hook");
    }

    #[test]
    fn a_name_with_any_link_local_address_is_refused() {
        let public = SocketAddr::from(([93, 184, 215, 14], 0));
        let metadata = SocketAddr::from(([169, 254, 169, 254], 0));
        assert_eq!(allowed_addresses("example.org", vec![public]).unwrap(), vec![public]);
        let refusal = allowed_addresses("rebound.example", vec![public, metadata]).unwrap_err();
        assert!(refusal.contains("169.254.169.254"), "{refusal}");
    }

    /// The client connects through the checking resolver: a name it resolves reaches its server, and a metadata
    /// name is refused by it (the stock resolver would have looked the name up instead).
    #[tokio::test]
    async fn the_client_connects_only_through_the_checking_resolver() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            socket.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        });
        let post = |url: String| http::Request::post(url).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
        let client = client();
        let answer = client.request(post(format!("http://localhost:{port}/hook"))).await.unwrap();
        assert_eq!(answer.status(), http::StatusCode::NO_CONTENT);
        let error = client.request(post("http://metadata.google.internal/v1".into())).await.unwrap_err();
        let reasons = causes(&error);
        assert!(reasons.contains("cloud metadata service"), "{reasons}");
    }
}
