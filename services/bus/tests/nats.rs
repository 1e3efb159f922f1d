//! The NATS JetStream bus against a real server (127.0.0.1:4222 where the project is tested;
//! `SMARTFARM_TEST_NATS_URL` points elsewhere): events published by one replica reach the others; a job handed out
//! goes to exactly one of the replicas that take its kind, including jobs handed out before any took them; a job
//! dropped undone or handed back is offered again at once, one sent to a wait that was cut short is kept for the
//! taker (or handed back when it stops), and a job done is gone from NATS; a replica whose consumer is rebuilt
//! hears nothing from before it started.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use smartfarm_bus::{Bus, Event, ImageStored, Job, JobKind, JobTaker, ReadingsCommitted};

/// The test NATS server, and a bus URL with a stream of the test's own.
fn nats_server_and_url() -> (String, String, String) {
    let server = smartfarm_bus::testing::nats_server();
    let name = format!("bus-test-{}", Uuid::now_v7().simple());
    let url = format!("{server}/{name}");
    (server, name, url)
}

fn scoring_job(n: u128) -> Job {
    Job::Score(ReadingsCommitted {
        farm_id: Uuid::from_u128(n),
        series: Vec::new(),
        scored_where_committed: false,
        handed_out: true,
        published_here: false,
        batch: None,
    })
}

/// How many jobs the bus's jobs stream holds (handed out and not done).
async fn jobs_waiting(server: &str, name: &str) -> u64 {
    let client = async_nats::connect(server.trim_start_matches("nats://")).await.unwrap();
    let mut stream = async_nats::jetstream::new(client).get_stream(format!("{name}-work")).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_taken_once_across_replicas_and_events_reach_every_replica() {
    let (server, name, url) = nats_server_and_url();
    let a = Bus::connect(&url).await.unwrap();
    let b = Bus::connect(&url).await.unwrap();
    let c = Bus::connect(&url).await.unwrap();

    // Events: A publishes, B hears it.
    let mut heard = b.subscribe();
    a.publish(Event::RulesChanged { farm_id: Uuid::from_u128(0) });
    let event = tokio::time::timeout(Duration::from_secs(10), heard.recv()).await.expect("B hears A").unwrap();
    assert_eq!(event, Event::RulesChanged { farm_id: Uuid::from_u128(0) });

    // Jobs: C hands out 40 scoring jobs, the first 10 before anyone takes jobs (they wait in NATS); A and B take
    // them, each once. A photo job goes to the one replica that takes those, not to the scorers.
    for n in 1..=10 {
        c.hand_out(scoring_job(n));
    }
    let mut waited = 0;
    while jobs_waiting(&server, &name).await < 10 {
        waited += 1;
        assert!(waited < 100, "the first 10 jobs did not reach NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut taken_by_a = a.take_work(JobKind::Score);
    let mut taken_by_b = b.take_work(JobKind::Score);
    let mut photos_by_c = c.take_work(JobKind::Diagnose);
    for n in 11..=40 {
        c.hand_out(scoring_job(n));
    }
    let photo = Job::Diagnose(ImageStored {
        handed_out: true,
        image_id: Uuid::from_u128(99),
        farm_id: Uuid::from_u128(99),
        device_id: Uuid::from_u128(99),
        sha256: "ab".repeat(32),
        content_type: "image/jpeg".into(),
        capture_time: std::time::SystemTime::UNIX_EPOCH,
    });
    a.hand_out(photo.clone());

    let mut takers: BTreeMap<Uuid, Vec<char>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The takers ask in turn (a taker's ask is never cut short: what NATS gives it, it gets).
    while takers.values().map(Vec::len).sum::<usize>() < 40 {
        assert!(tokio::time::Instant::now() < deadline, "only {} of 40 jobs were taken: {takers:?}", takers.len());
        for (taker, jobs) in [('A', &mut taken_by_a), ('B', &mut taken_by_b)] {
            let Some(work) = jobs.next_within(Duration::from_millis(200)).await else { continue };
            let Job::Score(committed) = work.job() else { panic!("a scorer was given {work:?}") };
            takers.entry(committed.farm_id).or_default().push(taker);
            work.done().await;
        }
    }
    let expected: Vec<Uuid> = (1..=40).map(Uuid::from_u128).collect();
    assert_eq!(takers.keys().copied().collect::<Vec<_>>(), expected, "every job, once: {takers:?}");
    assert!(takers.values().all(|taken| taken.len() == 1), "a job went to two takers: {takers:?}");
    assert!(takers.values().any(|taken| taken == &['A']) && takers.values().any(|taken| taken == &['B']), "both took");
    let work = photos_by_c.next_within(Duration::from_secs(10)).await.expect("C takes the photo job");
    assert_eq!(work.job(), &photo);

    // A job dropped undone (its taker stopped) is offered again at once, not ten minutes later.
    drop(work);
    let again = photos_by_c.next_within(Duration::from_secs(10)).await.expect("the photo job, offered again");
    assert_eq!(again.job(), &photo);
    again.done().await;

    // Done jobs are gone: NATS holds none.
    assert!(taken_by_a.next_within(Duration::from_millis(500)).await.is_none(), "a job marked done came back");
    assert_eq!(jobs_waiting(&server, &name).await, 0, "NATS still holds jobs that were done");

    // The test's streams go, so that NATS does not go on reserving their room; a second removal finds nothing.
    assert!(streams_left(&server, &name).await);
    a.remove_streams().await.unwrap();
    assert!(!streams_left(&server, &name).await, "the streams are still there");
    b.remove_streams().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sent_to_a_wait_cut_short_is_kept_and_a_job_handed_back_goes_to_another_replica_at_once() {
    let (server, name, url) = nats_server_and_url();
    let a = Bus::connect(&url).await.unwrap();
    let b = Bus::connect(&url).await.unwrap();
    let mut taken_by_a = a.take_work(JobKind::Score);
    let mut taken_by_b = b.take_work(JobKind::Score);

    // A leaves a wait (for work of its own, say) after NATS sent it a job: the job is there without waiting, not
    // sent into a closed inbox to wait ten minutes there.
    send_to_a_wait_cut_short(&server, &name, &mut taken_by_a, &b, 1).await;
    let work = arrived(&mut taken_by_a).await;
    assert_eq!(work.job(), &scoring_job(1));
    assert!(taken_by_a.arrived().await.is_none(), "one job came, once");

    // A is stopping: it hands the job back, and B, which asks now, gets it at once.
    work.hand_back().await;
    let again = taken_by_b.next_within(Duration::from_secs(5)).await.expect("B gets the job A handed back");
    assert_eq!(again.job(), &scoring_job(1));
    again.done().await;

    // A stops with a wait left open, on which a job comes: closing hands it back, and B gets it at once.
    send_to_a_wait_cut_short(&server, &name, &mut taken_by_a, &b, 2).await;
    taken_by_a.close().await;
    let again = taken_by_b.next_within(Duration::from_secs(5)).await.expect("B gets the job that came as A stopped");
    assert_eq!(again.job(), &scoring_job(2));
    again.done().await;
    assert_eq!(jobs_waiting(&server, &name).await, 0, "NATS still holds a job that was done");
    a.remove_streams().await.unwrap();
}

/// The job that came on a wait `taker` left (once the client has read it from the connection).
async fn arrived(taker: &mut JobTaker) -> smartfarm_bus::Work {
    for _ in 0..200 {
        if let Some(work) = taker.arrived().await {
            return work;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the job that came on the wait left open is not there");
}

/// A waits for a job, B hands job `n` out, and A leaves the wait once NATS has sent the job to it.
async fn send_to_a_wait_cut_short(server: &str, name: &str, a: &mut JobTaker, b: &Bus, n: u128) {
    let wait = a.next_within(Duration::from_secs(20));
    tokio::pin!(wait);
    // A's wait runs until its request is open in NATS.
    let mut waited = 0;
    while scoring_consumer(server, name).await.is_none_or(|consumer| consumer.num_waiting < 1) {
        waited += 1;
        assert!(waited < 200, "A's request for a job did not reach NATS");
        tokio::select! {
            _ = &mut wait => panic!("a job came before any was handed out"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    b.hand_out(scoring_job(n));
    let mut waited = 0;
    while scoring_consumer(server, name).await.is_none_or(|consumer| consumer.num_ack_pending < 1) {
        waited += 1;
        assert!(waited < 200, "NATS did not send the job to A's open request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What NATS says of the consumer of scoring jobs (requests for jobs open, jobs sent and not answered), once a
/// taker has asked for a job.
async fn scoring_consumer(server: &str, name: &str) -> Option<async_nats::jetstream::consumer::Info> {
    let client = async_nats::connect(server.trim_start_matches("nats://")).await.unwrap();
    let stream = async_nats::jetstream::new(client).get_stream(format!("{name}-work")).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream.get_consumer("jobs-score").await.ok()?;
    Some(consumer.info().await.unwrap().clone())
}

/// Whether NATS still has the events stream `name` or its work stream.
async fn streams_left(server: &str, name: &str) -> bool {
    let client = async_nats::connect(server.trim_start_matches("nats://")).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    jetstream.get_stream(name).await.is_ok() || jetstream.get_stream(format!("{name}-work")).await.is_ok()
}

/// A message larger than NATS takes is dropped at once (it would be refused every time), not tried again for
/// seconds while the events behind it wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_nats_takes_does_not_hold_up_the_ones_behind_it() {
    let (_server, _name, url) = nats_server_and_url();
    let a = Bus::connect(&url).await.unwrap();
    let b = Bus::connect(&url).await.unwrap();
    let mut heard = b.subscribe();
    let span = |n: u32| smartfarm_bus::SeriesSpan {
        device_id: Uuid::from_u128(n.into()),
        metric: format!("a_metric_with_a_rather_long_name_{n}"),
        first_time: std::time::SystemTime::UNIX_EPOCH,
        last_time: std::time::SystemTime::UNIX_EPOCH,
        readings: None,
    };
    // About 2 MB of JSON, over the server's default maximum of 1 MB.
    let huge = Event::ReadingsCommitted(ReadingsCommitted {
        farm_id: Uuid::from_u128(1),
        series: (0..15_000).map(span).collect(),
        scored_where_committed: true,
        handed_out: false,
        published_here: false,
        batch: None,
    });
    let published = std::time::Instant::now();
    a.publish(huge);
    a.publish(Event::RulesChanged { farm_id: Uuid::from_u128(2) });
    let event = tokio::time::timeout(Duration::from_secs(10), heard.recv()).await.expect("B hears A").unwrap();
    assert_eq!(event, Event::RulesChanged { farm_id: Uuid::from_u128(2) }, "the large one is not delivered");
    assert!(published.elapsed() < Duration::from_secs(2), "held up for {:?}", published.elapsed());
    a.remove_streams().await.unwrap();
}

/// Deletes every consumer of the events stream `name`, as a NATS server that restarted without its state would
/// have lost them: each replica's client then rebuilds its own.
async fn delete_event_consumers(server: &str, name: &str) -> usize {
    use tokio_stream::StreamExt;
    let client = async_nats::connect(server.trim_start_matches("nats://")).await.unwrap();
    let stream = async_nats::jetstream::new(client).get_stream(name).await.unwrap();
    let names: Vec<String> = stream.consumer_names().map(|name| name.unwrap()).collect().await;
    for consumer in &names {
        stream.delete_consumer(consumer).await.unwrap();
    }
    names.len()
}

/// A replica whose consumer breaks before it heard any event is not sent the stream's old events when its client
/// rebuilds the consumer (from the stream's beginning, for a consumer that saw nothing): it hears only what was
/// published after it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_consumer_does_not_replay_the_events_from_before_the_replica_started() {
    let (server, name, url) = nats_server_and_url();
    let a = Bus::connect(&url).await.unwrap();
    let old = |n: u128| Event::RulesChanged { farm_id: Uuid::from_u128(n) };
    for n in 1..=3 {
        a.publish(old(n));
    }
    let client = async_nats::connect(server.trim_start_matches("nats://")).await.unwrap();
    let mut events = async_nats::jetstream::new(client).get_stream(&name).await.unwrap();
    while events.info().await.unwrap().state.messages < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = Bus::connect(&url).await.unwrap();
    let mut heard = b.subscribe();
    assert_eq!(delete_event_consumers(&server, &name).await, 2, "one consumer per replica");

    // A publishes a new event a second until B hears one: B's consumer was rebuilt. What B heard is all it heard.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    for n in 100.. {
        a.publish(old(n));
        if let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(1), heard.recv()).await {
            got.push(event);
            while let Ok(event) = heard.try_recv() {
                got.push(event);
            }
            if got.iter().any(|event| matches!(event, Event::RulesChanged { farm_id } if farm_id.as_u128() >= 100)) {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "B's consumer was not rebuilt within a minute: {got:?}");
    }
    assert!(
        got.iter().all(|event| matches!(event, Event::RulesChanged { farm_id } if farm_id.as_u128() >= 100)),
        "only what was published after B started: {got:?}"
    );
    a.remove_streams().await.unwrap();
}
