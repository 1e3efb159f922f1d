//! smartfarm-alert owns alert rules (defined here, evaluated by the farm's edge agent and by the cloud on what it
//! ingests), the alerts they raise, and their fan-out: `AlertService.Subscribe` streams that resume from a cursor
//! without gaps, and signed webhooks with retries. It also turns the models' verdicts from the bus (diseases on
//! photos, sensor anomalies) into alerts. The alert event log in [`smartfarm_store::AlertStore`] is the record; the bus
//! only says that it moved, so a stream or webhook on any replica reads what another replica wrote. It holds no SQL.

#![forbid(unsafe_code)]

mod subscribe;
mod verdicts;
pub mod webhook;

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use smartfarm_bus::{AlertChanged, Bus, Event};
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::paging::{Page, time_id_key};
use smartfarm_core::rules::{Alert, AlertState, Rule, Severity};
use smartfarm_core::{Error, Principal, Result, time, validate};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::{AlertService, AlertServiceServer};
use smartfarm_store::alerts::{AlertEvent, AlertFilter, AlertRetention, Webhook, WebhookState};
use smartfarm_store::{AlertStore, ImageStore, RegistryStore, TelemetryStore};

/// How often alert events and resolved alerts past their retention are deleted.
const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Most events (and most alerts) deleted in one transaction.
const RETENTION_CHUNK: usize = 10_000;

/// The `AlertService` implementation, and the alert role's background work.
#[derive(Clone)]
pub struct AlertApi {
    registry: Arc<dyn RegistryStore>,
    alerts: Arc<dyn AlertStore>,
    bus: Bus,
    settings: Arc<AlertsConfig>,
    /// Where the batches scored for anomalies are listed and the photos diagnosed wait: the verdict listener
    /// confirms each once it has recorded what its verdicts raised.
    confirmations: verdicts::Confirmations,
}

/// Records an alert raised in the cloud (merged with any other copy) and announces the change on the bus.
pub async fn record(alerts: &dyn AlertStore, bus: &Bus, alert: &Alert) -> Result<Option<AlertEvent>> {
    let event = alerts.record_alert(alert).await?;
    if let Some(event) = &event {
        announce(bus, event, false);
    }
    Ok(event)
}

fn announce(bus: &Bus, event: &AlertEvent, by_hand: bool) {
    metrics::counter!("smartfarm_alert_events_total", "kind" => format!("{:?}", event.kind).to_lowercase())
        .increment(1);
    bus.publish(Event::AlertChanged(AlertChanged {
        sequence: event.sequence,
        kind: event.kind,
        alert: event.alert.clone(),
        by_hand,
    }));
}

impl AlertApi {
    pub fn new(
        registry: Arc<dyn RegistryStore>,
        alerts: Arc<dyn AlertStore>,
        bus: Bus,
        settings: AlertsConfig,
    ) -> AlertApi {
        AlertApi {
            registry,
            alerts,
            bus,
            settings: Arc::new(settings),
            confirmations: verdicts::Confirmations::default(),
        }
    }

    /// Confirms batches scored for anomalies in `telemetry` once their stretches' alerts are recorded, and photos'
    /// verdicts in `images` once recorded (see `run_verdicts`). Without it the batches stay listed until the late
    /// scorer has tried them a few times, and the photos are diagnosed again late for a day.
    pub fn with_confirmations(mut self, telemetry: Arc<dyn TelemetryStore>, images: Arc<dyn ImageStore>) -> AlertApi {
        self.confirmations =
            verdicts::Confirmations { scored_batches: Some(telemetry), diagnosed_photos: Some(images) };
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> AlertServiceServer<AlertApi> {
        AlertServiceServer::new(self)
    }

    /// Turns the models' verdicts on the bus into alerts, forever; run it in a task of its own.
    pub async fn run_verdicts(self) {
        verdicts::run(self.alerts.clone(), self.bus.clone(), self.confirmations.clone()).await
    }

    /// Deletes alert events and resolved alerts past `retention` every hour, forever; run it in a task of its own.
    pub async fn run_retention(self) {
        let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
        loop {
            ticks.tick().await;
            if let Err(error) = self.apply_retention(time::now()).await {
                tracing::warn!(%error, "cannot delete old alerts; trying again in an hour");
            }
        }
    }

    /// Deletes the alert events and resolved alerts past `retention` at `now` (nothing when it is zero), a chunk at
    /// a time so no transaction grows large. Every call also notes where the event log stands, which is how later
    /// calls age events: an event is deleted by the first call a retention after the call that first saw it.
    pub async fn apply_retention(&self, now: std::time::SystemTime) -> Result<AlertRetention> {
        let retention = self.settings.retention;
        if retention.is_zero() {
            return Ok(AlertRetention::default());
        }
        let before = now.checked_sub(retention).unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        let mut deleted = AlertRetention::default();
        loop {
            let chunk = self.alerts.apply_alert_retention(now, before, RETENTION_CHUNK).await?;
            deleted.events += chunk.events;
            deleted.alerts += chunk.alerts;
            metrics::counter!("smartfarm_alert_events_deleted_total").increment(chunk.events);
            metrics::counter!("smartfarm_alerts_deleted_total").increment(chunk.alerts);
            if chunk.events < RETENTION_CHUNK as u64 && chunk.alerts < RETENTION_CHUNK as u64 {
                break;
            }
        }
        if deleted != AlertRetention::default() {
            tracing::info!(
                events = deleted.events,
                alerts = deleted.alerts,
                ?retention,
                "alerts past their retention deleted"
            );
        }
        Ok(deleted)
    }

    /// Delivers alert events to webhooks, forever; run it in a task of its own.
    pub async fn run_webhooks(self) {
        webhook::Dispatcher::new(self.alerts.clone(), self.bus.clone(), (*self.settings).clone()).run().await
    }

    async fn authorized_alert(&self, principal: &Principal, id: &str) -> Result<Alert> {
        let alert = self.alerts.get_alert(validate::id("alert_id", id)?).await?;
        principal.authorize_farm(alert.farm_id)?;
        Ok(alert)
    }

    /// Resolves, as by hand, the alerts of a rule being deleted that are not resolved: no evaluator will resolve
    /// them once it is gone (the agent and the links drop a deleted rule's state, resolving what they held open;
    /// this covers what no running evaluator holds, such as the alerts of an agent that is offline). Returns how
    /// many it resolved.
    async fn resolve_alerts_of_rule(&self, rule: &Rule) -> Result<usize> {
        let filter = AlertFilter {
            farm_id: Some(rule.farm_id),
            states: vec![AlertState::Open, AlertState::Acknowledged],
            min_severity: None,
            opened_from: None,
            opened_before: None,
        };
        let mut resolved = 0;
        let mut after = None;
        loop {
            let page = self.alerts.list_alerts(&filter, after, 500).await?;
            let Some(last) = page.last() else { return Ok(resolved) };
            after = Some((last.open_time, last.id));
            for alert in page.iter().filter(|alert| alert.rule_id == rule.id) {
                let (_, event) = self.alerts.set_alert_state(alert.id, AlertState::Resolved, time::now()).await?;
                if let Some(event) = &event {
                    announce(&self.bus, event, true);
                    resolved += 1;
                }
            }
        }
    }

    async fn change_state(&self, principal: &Principal, id: &str, state: AlertState) -> Result<Alert> {
        let alert = self.authorized_alert(principal, id).await?;
        let (alert, event) = self.alerts.set_alert_state(alert.id, state, time::now()).await?;
        if let Some(event) = &event {
            announce(&self.bus, event, true);
        }
        tracing::info!(alert_id = %alert.id, state = state.name(), by = %principal.describe(), "alert changed by hand");
        Ok(alert)
    }
}

/// The caller of an alert RPC: people and integrations (API keys), not gateways.
fn api_caller<T>(request: &Request<T>) -> Result<Principal> {
    let principal = Principal::of(request)?;
    principal.require_api_key()?;
    Ok(principal)
}

/// The farm a request is confined to: a farm key's own (asking for another is denied), or what an admin names.
fn scope(principal: &Principal, requested: &str) -> Result<Option<Uuid>> {
    let requested = validate::optional_id("farm_id", requested)?;
    match (principal.farm_scope(), requested) {
        (None, requested) => Ok(requested),
        (Some(own), None) => Ok(Some(own)),
        (Some(_), Some(requested)) => principal.authorize_farm(requested).map(|()| Some(requested)),
    }
}

#[tonic::async_trait]
impl AlertService for AlertApi {
    type SubscribeStream = subscribe::Stream;

    async fn create_rule(
        &self,
        request: Request<pb::CreateRuleRequest>,
    ) -> Result<Response<pb::CreateRuleResponse>, Status> {
        let principal = api_caller(&request)?;
        let wire = request.get_ref().rule.as_ref().ok_or_else(|| Error::invalid("rule", "is required"))?;
        let rule = Rule::from_create_request(wire, Uuid::now_v7(), time::now())?;
        principal.authorize_farm(rule.farm_id)?;
        if let Some(device_id) = rule.device_id {
            let device = self.registry.get_device(device_id).await?;
            if device.farm_id != rule.farm_id {
                return Err(Error::invalid("rule.device_id", "is a device of another farm").into());
            }
        }
        let version = self.alerts.create_rule(&rule).await?;
        self.bus.publish(Event::RulesChanged { farm_id: rule.farm_id });
        tracing::info!(rule_id = %rule.id, farm_id = %rule.farm_id, version, by = %principal.describe(), "rule created");
        Ok(Response::new(pb::CreateRuleResponse { rule: Some(rule.to_proto()) }))
    }

    async fn list_rules(
        &self,
        request: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = validate::id("farm_id", &message.farm_id)?;
        principal.authorize_farm(farm_id)?;
        let fingerprint = format!("rules;{farm_id}");
        let page = Page::from_request(message.page_size, &message.page_token, &fingerprint)?;
        let rules = self.alerts.list_rules(farm_id, page.after_id()?, page.fetch_limit()).await?;
        let (rules, next_page_token) = page.finish(rules, |rule| rule.id.to_string(), &fingerprint);
        Ok(Response::new(pb::ListRulesResponse { rules: rules.iter().map(Rule::to_proto).collect(), next_page_token }))
    }

    async fn delete_rule(
        &self,
        request: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        let principal = api_caller(&request)?;
        let id = validate::id("rule_id", &request.get_ref().rule_id)?;
        let rule = self.alerts.get_rule(id).await?;
        principal.authorize_farm(rule.farm_id)?;
        // Resolved before the rule goes, so a failure leaves the rule for the caller to delete again; and after,
        // for an alert raised meanwhile (the evaluators that hold one end it too, once the change reaches them).
        let mut resolved = self.resolve_alerts_of_rule(&rule).await?;
        self.alerts.delete_rule(id).await?;
        self.bus.publish(Event::RulesChanged { farm_id: rule.farm_id });
        match self.resolve_alerts_of_rule(&rule).await {
            Ok(more) => resolved += more,
            Err(error) => tracing::warn!(rule_id = %id, %error, "cannot resolve the alerts a deleted rule raised last"),
        }
        tracing::info!(rule_id = %id, farm_id = %rule.farm_id, resolved, by = %principal.describe(), "rule deleted");
        Ok(Response::new(pb::DeleteRuleResponse {}))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = scope(&principal, &message.farm_id)?;
        let mut states = message
            .states
            .iter()
            .filter(|state| **state != 0)
            .map(|state| AlertState::from_proto("states", *state))
            .collect::<Result<Vec<_>>>()?;
        states.sort();
        states.dedup();
        let min_severity = (message.min_severity != 0)
            .then(|| Severity::from_proto("min_severity", message.min_severity))
            .transpose()?;
        let (opened_from, opened_before) = match &message.open_time_range {
            None => (None, None),
            Some(range) => {
                let bound = |field: &str, value: &Option<smartfarm_proto::pbjson_types::Timestamp>| {
                    value.as_ref().map(|t| time::from_timestamp(field, t)).transpose()
                };
                let from = bound("open_time_range.start_time", &range.start_time)?;
                let before = bound("open_time_range.end_time", &range.end_time)?;
                if let (Some(from), Some(before)) = (from, before)
                    && from >= before
                {
                    return Err(Error::invalid("open_time_range", "start_time must be before end_time").into());
                }
                (from, before)
            }
        };
        let filter = AlertFilter { farm_id, states, min_severity, opened_from, opened_before };
        let fingerprint = format!("alerts;{filter:?}");
        let page = Page::from_request(message.page_size, &message.page_token, &fingerprint)?;
        let after = page.after_time_id()?;
        let alerts = self.alerts.list_alerts(&filter, after, page.fetch_limit()).await?;
        let (alerts, next_page_token) =
            page.finish(alerts, |alert| time_id_key(alert.open_time, alert.id), &fingerprint);
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.iter().map(Alert::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn acknowledge_alert(
        &self,
        request: Request<pb::AcknowledgeAlertRequest>,
    ) -> Result<Response<pb::AcknowledgeAlertResponse>, Status> {
        let principal = api_caller(&request)?;
        let alert = self.change_state(&principal, &request.get_ref().alert_id, AlertState::Acknowledged).await?;
        Ok(Response::new(pb::AcknowledgeAlertResponse { alert: Some(alert.to_proto()) }))
    }

    async fn resolve_alert(
        &self,
        request: Request<pb::ResolveAlertRequest>,
    ) -> Result<Response<pb::ResolveAlertResponse>, Status> {
        let principal = api_caller(&request)?;
        let alert = self.change_state(&principal, &request.get_ref().alert_id, AlertState::Resolved).await?;
        Ok(Response::new(pb::ResolveAlertResponse { alert: Some(alert.to_proto()) }))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = scope(&principal, &message.farm_id)?;
        let min_severity = Severity::minimum_from_proto("min_severity", message.min_severity)?;
        let cursor = match message.cursor.as_str() {
            "" => None,
            cursor => Some(
                cursor.parse::<u64>().map_err(|_| Error::invalid("cursor", "is not a cursor this stream returned"))?,
            ),
        };
        principal.require_api_key()?;
        let api_key_id = principal.api_key_id().expect("an api key, checked above");
        let opened_with = subscribe::OpenedWith { registry: self.registry.clone(), api_key_id };
        let stream = subscribe::open(
            self.alerts.clone(),
            opened_with,
            &self.bus,
            farm_id,
            min_severity,
            cursor,
            self.settings.stream_heartbeat,
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn create_webhook(
        &self,
        request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::CreateWebhookResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = validate::id("farm_id", &message.farm_id)?;
        principal.authorize_farm(farm_id)?;
        let min_severity = Severity::minimum_from_proto("min_severity", message.min_severity)?;
        let url = webhook::check_url(&message.url).await?;
        self.registry.get_farm(farm_id).await?;
        let secret = webhook::new_secret()?;
        let webhook = Webhook {
            id: Uuid::now_v7(),
            farm_id,
            url,
            min_severity,
            secret: secret.clone(),
            state: WebhookState::Healthy,
            consecutive_failures: 0,
            last_error: None,
            last_success_time: None,
            create_time: time::now(),
            // Alerts from now on: a new webhook is not flooded with the farm's history.
            delivered_sequence: self.alerts.last_alert_event().await?,
        };
        self.alerts.create_webhook(&webhook).await?;
        tracing::info!(webhook_id = %webhook.id, %farm_id, by = %principal.describe(), "webhook created");
        Ok(Response::new(pb::CreateWebhookResponse {
            webhook: Some(webhook::to_proto(&webhook)),
            signing_secret: secret,
        }))
    }

    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let farm_id = validate::id("farm_id", &message.farm_id)?;
        principal.authorize_farm(farm_id)?;
        let fingerprint = format!("webhooks;{farm_id}");
        let page = Page::from_request(message.page_size, &message.page_token, &fingerprint)?;
        let webhooks = self.alerts.list_webhooks(Some(farm_id), page.after_id()?, page.fetch_limit()).await?;
        let (webhooks, next_page_token) = page.finish(webhooks, |webhook| webhook.id.to_string(), &fingerprint);
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: webhooks.iter().map(webhook::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let principal = api_caller(&request)?;
        let id = validate::id("webhook_id", &request.get_ref().webhook_id)?;
        let webhook = self.alerts.get_webhook(id).await?;
        principal.authorize_farm(webhook.farm_id)?;
        self.alerts.delete_webhook(id).await?;
        tracing::info!(webhook_id = %id, by = %principal.describe(), "webhook deleted");
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }
}
