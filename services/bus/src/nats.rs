//! The NATS JetStream backend. Events are JSON messages on one subject of one stream (file storage, a day of
//! history), each with the id of the process that published it: a publisher task writes them in order and waits for
//! JetStream's acknowledgement (retrying a few times while NATS is away), and every process follows the stream with
//! an ordered consumer from "new" on, handing the other processes' events to its local subscribers (its own reached
//! them when published). Events NATS does not take after the retries, or that find the bounded queue full, are
//! dropped, counted and logged; consumers catch up from the database.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;

use smartfarm_core::Error;

use crate::Event;

/// How many times a publish is tried before the event is dropped.
const PUBLISH_ATTEMPTS: u32 = 8;
/// Events waiting for NATS at most.
const QUEUE: usize = 10_000;

/// An event as it travels: with the process that published it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    origin: uuid::Uuid,
    event: Event,
}

/// Splits `nats://HOST:PORT[/NAME]` into the server URL and the stream name.
fn parse(url: &str) -> Result<(String, String), Error> {
    let rest = url.strip_prefix("nats://").ok_or_else(|| {
        Error::invalid("bus_url", format!("{url:?} is not a bus url: expected nats://HOST:PORT[/NAME]"))
    })?;
    let (server, name) = match rest.split_once('/') {
        Some((server, name)) => (server, name.trim_end_matches('/')),
        None => (rest, ""),
    };
    if server.is_empty() {
        return Err(Error::invalid("bus_url", "names no NATS server: expected nats://HOST:PORT[/NAME]"));
    }
    let name = if name.is_empty() { "smartfarm" } else { name };
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') || name.len() > 64 {
        return Err(Error::invalid("bus_url", "the stream name must be 1 to 64 of A-Z, a-z, 0-9, '-', '_'"));
    }
    Ok((format!("nats://{server}"), name.to_string()))
}

/// Connects, makes sure the stream exists, starts following it into `local` and returns where to publish.
pub(crate) async fn connect(url: &str, local: broadcast::Sender<Event>) -> Result<mpsc::Sender<Event>, Error> {
    let (server, name) = parse(url)?;
    let me = uuid::Uuid::now_v7();
    let client = async_nats::ConnectOptions::new()
        .name("smartfarm")
        .connection_timeout(Duration::from_secs(10))
        .connect(&server)
        .await
        .map_err(|error| Error::Unavailable(format!("cannot connect to NATS at {server}: {error}")))?;
    let context = jetstream::new(client);
    let subject = format!("{name}.events");
    let stream = context
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
            ..Default::default()
        })
        .await
        .map_err(|error| {
            Error::Unavailable(format!("cannot set up the JetStream stream {name} on {server}: {error}"))
        })?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .map_err(|error| Error::Unavailable(format!("cannot follow the JetStream stream {name}: {error}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|error| Error::Unavailable(format!("cannot follow the JetStream stream {name}: {error}")))?;
    tracing::info!(%server, stream = %name, "bus on NATS JetStream");

    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => match serde_json::from_slice::<Envelope>(&message.payload) {
                    Ok(envelope) if envelope.origin == me => {}
                    Ok(envelope) => {
                        let _ = local.send(envelope.event);
                    }
                    Err(error) => {
                        metrics::counter!("smartfarm_bus_events_unreadable_total").increment(1);
                        tracing::warn!(%error, "an event on the bus is not one this version reads; skipped");
                    }
                },
                Err(error) => tracing::warn!(%error, "following the bus stream failed; the consumer resumes"),
            }
        }
        tracing::error!("the bus stream ended: this process no longer hears the others");
    });

    let (outbound, mut queue) = mpsc::channel::<Event>(QUEUE);
    tokio::spawn(async move {
        while let Some(event) = queue.recv().await {
            let payload = match serde_json::to_vec(&Envelope { origin: me, event }) {
                Ok(payload) => bytes::Bytes::from(payload),
                Err(error) => {
                    tracing::error!(%error, "an event cannot be written as JSON; dropped");
                    continue;
                }
            };
            let mut wait = Duration::from_millis(50);
            let mut attempt = 1;
            loop {
                let published = match context.publish(subject.clone(), payload.clone()).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                match published {
                    Ok(()) => break,
                    Err(error) if attempt >= PUBLISH_ATTEMPTS => {
                        metrics::counter!("smartfarm_bus_events_dropped_total").increment(1);
                        tracing::error!(%error, "cannot publish an event to NATS; dropped (consumers catch up from the database)");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, attempt, "publishing an event to NATS failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                        attempt += 1;
                    }
                }
            }
        }
    });
    Ok(outbound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_urls_name_a_server_and_a_stream() {
        assert_eq!(parse("nats://127.0.0.1:4222").unwrap(), ("nats://127.0.0.1:4222".into(), "smartfarm".into()));
        assert_eq!(parse("nats://nats:4222/farm-a/").unwrap(), ("nats://nats:4222".into(), "farm-a".into()));
        assert!(parse("redis://127.0.0.1").unwrap_err().to_string().starts_with("bus_url:"));
        assert!(parse("nats:///x").is_err());
        assert!(parse("nats://h:1/a.b").is_err());
    }
}
