//! The NATS JetStream bus against a real server (127.0.0.1:4222 where the project is tested;
//! `SMARTFARM_TEST_NATS_URL` points elsewhere): events published by one replica reach the others, and work handed
//! out goes to exactly one of the replicas that take it, including work handed out before any took it.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use smartfarm_bus::{Bus, Event};

/// A stream of the test's own on the test NATS server; fails, saying how to start NATS, when none answers.
fn nats_url() -> String {
    let server = std::env::var("SMARTFARM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = server.trim_start_matches("nats://");
    assert!(
        std::net::TcpStream::connect(address).is_ok(),
        "no NATS server answers at {server}: the bus tests need NATS with JetStream (Debian package nats-server), \
         e.g. `nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server`, or SMARTFARM_TEST_NATS_URL"
    );
    format!("{server}/bus-test-{}", Uuid::now_v7().simple())
}

fn numbered(n: u128) -> Event {
    Event::RulesChanged { farm_id: Uuid::from_u128(n) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_is_taken_once_across_replicas_and_events_reach_every_replica() {
    let url = nats_url();
    let a = Bus::connect(&url).await.unwrap();
    let b = Bus::connect(&url).await.unwrap();
    let c = Bus::connect(&url).await.unwrap();

    // Events: A publishes, B hears it.
    let mut heard = b.subscribe();
    a.publish(numbered(0));
    let event = tokio::time::timeout(Duration::from_secs(10), heard.recv()).await.expect("B hears A").unwrap();
    assert_eq!(event, numbered(0));

    // Work: C hands out 40 pieces, the first 10 before anyone takes work; A and B take them, each piece once.
    for n in 1..=10 {
        c.hand_out(numbered(n));
    }
    let mut taken_by_a = a.take_work();
    let mut taken_by_b = b.take_work();
    for n in 11..=40 {
        c.hand_out(numbered(n));
    }
    let mut takers: BTreeMap<Uuid, Vec<char>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while takers.values().map(Vec::len).sum::<usize>() < 40 {
        let (work, taker) = tokio::select! {
            Some(work) = taken_by_a.recv() => (work, 'A'),
            Some(work) = taken_by_b.recv() => (work, 'B'),
            _ = tokio::time::sleep_until(deadline) => panic!("only {} of 40 pieces of work were taken", takers.len()),
        };
        let Event::RulesChanged { farm_id } = work.event() else { panic!("not the work handed out: {work:?}") };
        takers.entry(*farm_id).or_default().push(taker);
        work.done().await;
    }
    // Done work is not handed out again.
    let again = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::select! {
            Some(work) = taken_by_a.recv() => work,
            Some(work) = taken_by_b.recv() => work,
        }
    })
    .await;
    assert!(again.is_err(), "work marked done came back: {again:?}");
    let expected: Vec<Uuid> = (1..=40).map(Uuid::from_u128).collect();
    assert_eq!(takers.keys().copied().collect::<Vec<_>>(), expected, "every piece, once: {takers:?}");
    assert!(takers.values().all(|taken| taken.len() == 1), "a piece went to two takers: {takers:?}");
}
