//! Clients that misbehave, against a real broker: an oversized message, a thousand streams on one connection, a
//! worker and a watcher that never read their streams, a worker that streams completions without reading their
//! answers, a flood of Enqueues past the replica's request limit, and a database statement stuck on a lock. Each
//! gets a clear error (or is simply not served), and the broker keeps serving everyone else promptly, and still
//! shuts down.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient, lease_request};
use sqlx::{Connection as _, PgConnection};
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Endpoint};

/// What "promptly" means for a client that is not misbehaving, on a small shared machine.
const PROMPTLY: Duration = Duration::from_secs(3);
const SOON: Duration = Duration::from_secs(10);

async fn settings() -> Settings {
    let mut settings = Settings::with_database(test_database().await);
    settings.shutdown_grace = Duration::from_secs(2);
    settings.reaper_interval = Duration::from_millis(100);
    settings
}

/// A GetJob from a fresh connection answers within [`PROMPTLY`].
async fn served_promptly(broker: &TestBroker, id: &str) {
    let started = Instant::now();
    let mut client = broker.client().await;
    let job = tokio::time::timeout(PROMPTLY, get_job(&mut client, id)).await.expect("another client is served");
    assert_eq!(job.id, id);
    assert!(started.elapsed() < PROMPTLY, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn an_oversized_message_is_refused_naming_the_limit() {
    let mut settings = settings().await;
    settings.limits.max_message_bytes = 64 * 1024;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let big = pb::JobSpec::new("abuse", "big", vec![b'x'; 100 * 1024]);
    let status = client.enqueue(pb::EnqueueRequest { jobs: vec![big] }).await.expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("65536"), "the message names the limit: {status:?}");
    // The same connection and the broker carry on.
    let ids = enqueue(&mut client, vec![pb::JobSpec::new("abuse", "small", b"ok".to_vec())]).await;
    served_promptly(&broker, &ids[0]).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_thousand_streams_on_one_connection_get_only_the_per_connection_limit() {
    const LIMIT: u32 = 8;
    const STREAMS: usize = 1000;
    let mut settings = settings().await;
    settings.serving.max_concurrent_streams = LIMIT;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let ids = enqueue(&mut client, vec![pb::JobSpec::new("abuse", "watched", b"x".to_vec())]).await;
    let id = ids[0].clone();

    // One connection (one channel), a thousand WatchJob calls: a stream that opens holds its slot while the job
    // stays queued. Those beyond the limit wait in the client and time out there.
    let mut calls = JoinSet::new();
    for _ in 0..STREAMS {
        let mut client = client.clone();
        let request = pb::WatchJobRequest { id: id.clone() };
        calls.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(3), client.watch_job(request)).await {
                Ok(Ok(stream)) => Some(stream.into_inner()),
                Ok(Err(status)) => panic!("a watch failed instead of waiting: {status:?}"),
                Err(_elapsed) => None,
            }
        });
        tokio::task::yield_now().await;
    }
    // Meanwhile another client, on its own connection, is served at once.
    served_promptly(&broker, &id).await;
    let mut open = Vec::new();
    while let Some(outcome) = calls.join_next().await {
        open.extend(outcome.expect("the call task ran"));
    }
    assert_eq!(open.len(), LIMIT as usize, "exactly the per-connection limit of streams was served");
    // Closing the open streams frees the connection for new calls.
    drop(open);
    let job = tokio::time::timeout(PROMPTLY, get_job(&mut client, &id)).await.expect("the connection recovers");
    assert_eq!(job.state(), pb::JobState::Queued);
    broker.stop().await;
}

/// A client connection whose flow-control windows are the HTTP/2 minimum: it can hold 64 KiB of unread data.
async fn tight_client(broker: &TestBroker) -> BrokerServiceClient<tonic::transport::Channel> {
    let endpoint = Endpoint::from_shared(broker.url.clone())
        .expect("a URL")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535);
    BrokerServiceClient::new(endpoint.connect().await.expect("connected"))
}

#[tokio::test]
async fn a_worker_that_never_reads_its_stream_stalls_nobody() {
    let broker = TestBroker::start(settings().await).await;
    let mut producer = broker.client().await;

    // The stalled worker registers for 4 jobs and never reads its assignments (2 MB against a 64 KiB window).
    let mut stalled = tight_client(&broker).await;
    let register =
        pb::Register { worker_id: "stalled".into(), queues: vec!["abuse".into()], capacity: 4, ..Default::default() };
    let first = pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) };
    let requests = tokio_stream::iter([first]).chain(tokio_stream::pending());
    let _unread = stalled.lease(requests).await.expect("the stream opens").into_inner();
    let big = |n: u8| pb::JobSpec {
        lease_ttl: Some(duration(Duration::from_secs(1))),
        ..pb::JobSpec::new("abuse", "big", vec![n; 512 * 1024])
    };
    let big_ids = enqueue(&mut producer, (0..4).map(big).collect()).await;
    for id in &big_ids {
        wait_for("the stalled worker to be handed the job", SOON, || {
            let mut producer = producer.clone();
            async move { (get_job(&mut producer, id).await.worker_id == "stalled").then_some(()) }
        })
        .await;
    }

    // A healthy worker is served promptly: a new job at once, and the stalled worker's jobs once their leases
    // (1 s, never heartbeated) are lost.
    let mut healthy = TestWorker::connect(broker.client().await, "healthy", &["abuse"], 8).await;
    let small = enqueue(&mut producer, vec![pb::JobSpec::new("abuse", "small", b"s".to_vec())]).await;
    let assignment = healthy.assignment(PROMPTLY).await;
    assert_eq!(assignment.job.expect("a job").id, small[0]);
    let mut rescued = Vec::new();
    for _ in 0..4 {
        let assignment = healthy.assignment(SOON).await;
        let job = assignment.job.expect("a job");
        assert_eq!(job.spec.expect("a spec").payload.len(), 512 * 1024);
        healthy.succeed(&assignment.lease_id, b"done").await.expect("completed");
        rescued.push(job.id);
    }
    rescued.sort();
    let mut expected = big_ids.clone();
    expected.sort();
    assert_eq!(rescued, expected);
    served_promptly(&broker, &small[0]).await;

    // Shutdown does not wait on the stalled client for more than its grace.
    let started = Instant::now();
    broker.stop().await;
    assert!(started.elapsed() < Duration::from_secs(8), "stop took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_worker_that_sends_completions_but_never_reads_the_answers_is_held_back() {
    let mut settings = settings().await;
    settings.limits.max_stream_capacity = 16;
    let broker = TestBroker::start(settings).await;
    let mut producer = broker.client().await;
    let ids = enqueue(&mut producer, vec![pb::JobSpec::new("abuse", "one", b"1".to_vec())]).await;

    // Completions that fail validation at once, without end, counted as the transport takes them; no answer read.
    let sent = Arc::new(AtomicUsize::new(0));
    let register =
        pb::Register { worker_id: "spammer".into(), queues: vec!["idle".into()], capacity: 1, ..Default::default() };
    let first = pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) };
    let counter = sent.clone();
    let spam = std::iter::repeat_with(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        let complete = pb::CompleteRequest {
            lease_id: "not-a-lease".into(),
            outcome: Some(pb::complete_request::Outcome::Release(pb::Release {})),
        };
        pb::LeaseRequest { request: Some(lease_request::Request::Complete(complete)) }
    });
    let mut spammer = tight_client(&broker).await;
    let _unread = spammer.lease(tokio_stream::iter(std::iter::once(first).chain(spam))).await.expect("opens");

    // The broker stops reading once its answers are not taken: the count stops growing (it would grow forever,
    // and the broker's memory with it, if answers piled up without bound).
    let deadline = Instant::now() + SOON;
    let mut last = sent.load(Ordering::Relaxed);
    let held_at = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last && now > 16 {
            break now;
        }
        assert!(Instant::now() < deadline, "still reading after {now} completions: the stream is never held back");
        last = now;
    };
    assert!(held_at < 200_000, "held back only after {held_at} completions");
    served_promptly(&broker, &ids[0]).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_watcher_that_never_reads_its_stream_stalls_nobody() {
    let broker = TestBroker::start(settings().await).await;
    let mut producer = broker.client().await;
    let ids = enqueue(&mut producer, vec![pb::JobSpec::new("abuse", "big", vec![b'w'; 512 * 1024])]).await;
    let id = ids[0].clone();
    let mut unread_watches = Vec::new();
    for _ in 0..4 {
        let mut watcher = tight_client(&broker).await;
        let watch = watcher.watch_job(pb::WatchJobRequest { id: id.clone() }).await.expect("the watch opens");
        unread_watches.push((watcher, watch.into_inner()));
    }

    // Many observable changes (progress), far more than the watchers' windows and buffers hold.
    let mut worker = TestWorker::connect(broker.client().await, "w", &["abuse"], 1).await;
    let assignment = worker.assignment(PROMPTLY).await;
    for percent in 1..=40 {
        let progress = pb::Progress { percent, message: format!("step {percent}") };
        let started = Instant::now();
        let status = worker.heartbeat(&assignment.lease_id, Some(progress)).await;
        assert!(status.active && started.elapsed() < PROMPTLY, "heartbeat {percent} took {:?}", started.elapsed());
    }
    assert_eq!(worker.succeed(&assignment.lease_id, b"done").await.expect("completed"), pb::JobState::Succeeded);
    served_promptly(&broker, &id).await;

    let started = Instant::now();
    broker.stop().await;
    assert!(started.elapsed() < Duration::from_secs(8), "stop took {:?}", started.elapsed());
    drop(unread_watches);
}

#[tokio::test]
async fn a_flood_past_the_request_limit_is_shed_and_the_broker_recovers() {
    const LIMIT: usize = 8;
    let mut settings = settings().await;
    settings.serving.max_concurrent_requests = LIMIT;
    let broker = TestBroker::start(settings).await;

    // Open Lease streams do not hold a permit: more streams than the limit, and requests still pass.
    let mut workers = Vec::new();
    for n in 0..LIMIT + 2 {
        workers.push(TestWorker::connect(broker.client().await, &format!("w{n}"), &["idle"], 1).await);
    }
    let mut client = broker.client().await;
    enqueue(&mut client, vec![pb::JobSpec::new("abuse", "one", b"1".to_vec())]).await;

    // Lease calls that never send their first message hold a permit each (until --request-timeout): take all.
    let mut holders = JoinSet::new();
    let mut handles = Vec::new();
    for _ in 0..LIMIT {
        let mut client = broker.client().await;
        handles.push(holders.spawn(async move { client.lease(tokio_stream::pending::<pb::LeaseRequest>()).await }));
    }
    let probe = || pb::EnqueueRequest { jobs: vec![pb::JobSpec::new("abuse", "probe", b"p".to_vec())] };
    let status = wait_for("every permit to be taken", SOON, || {
        let mut client = client.clone();
        async move { client.enqueue(probe()).await.err().filter(|s| s.code() == Code::ResourceExhausted) }
    })
    .await;
    assert!(status.message().contains("--max-concurrent-requests"), "{status:?}");
    // Health is exempt: probes answer on a saturated replica.
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health answers");

    // Two holders give up: two permits free again.
    for handle in handles.drain(..2) {
        handle.abort();
    }
    wait_for("a permit to be free", SOON, || {
        let mut client = client.clone();
        async move { client.enqueue(probe()).await.ok() }
    })
    .await;

    // The flood: 200 concurrent Enqueues through the two free permits.
    let mut flood = JoinSet::new();
    for n in 0..200 {
        let mut client = client.clone();
        let job = pb::JobSpec::new("abuse", "flood", n.to_string().into_bytes());
        flood.spawn(async move { client.enqueue(pb::EnqueueRequest { jobs: vec![job] }).await });
    }
    let (mut accepted, mut shed) = (Vec::new(), 0);
    while let Some(outcome) = flood.join_next().await {
        match outcome.expect("the task ran") {
            Ok(answer) => accepted.push(answer.into_inner().jobs[0].id.clone()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("--max-concurrent-requests"), "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(shed > 0 && !accepted.is_empty(), "accepted {}, shed {shed}", accepted.len());
    for id in &accepted {
        assert_eq!(get_job(&mut client, id).await.state(), pb::JobState::Queued, "an accepted job is stored");
    }
    // The holders give up; every request is served again.
    holders.abort_all();
    while holders.join_next().await.is_some() {}
    let mut burst = JoinSet::new();
    for n in 0..LIMIT {
        let mut client = client.clone();
        let job = pb::JobSpec::new("abuse", "after", n.to_string().into_bytes());
        burst.spawn(async move { client.enqueue(pb::EnqueueRequest { jobs: vec![job] }).await.map(drop) });
    }
    while let Some(outcome) = burst.join_next().await {
        outcome.expect("the task ran").expect("served again after the flood");
    }
    drop(workers);
    broker.stop().await;
}

#[tokio::test]
async fn a_statement_stuck_on_a_lock_is_cut_by_the_statement_timeout() {
    let mut settings = settings().await;
    settings.statement_timeout = Duration::from_secs(1);
    let database = settings.database_url.clone();
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let ids = enqueue(&mut client, vec![pb::JobSpec::new("abuse", "locked", b"x".to_vec())]).await;

    // Another session locks the jobs table: the broker's read waits on the lock until its statement timeout.
    let mut locker = PgConnection::connect(&database).await.expect("connected");
    sqlx::query("BEGIN").execute(&mut locker).await.expect("begun");
    sqlx::query("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").execute(&mut locker).await.expect("locked");
    let started = Instant::now();
    let status = client.get_job(pb::GetJobRequest { id: ids[0].clone() }).await.expect_err("cut off");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(10), "waited {waited:?}");
    assert!(matches!(status.code(), Code::Unavailable | Code::Internal), "{status:?}");
    assert!(!status.message().to_lowercase().contains("statement"), "no SQL detail leaks: {status:?}");
    sqlx::query("ROLLBACK").execute(&mut locker).await.expect("unlocked");
    served_promptly(&broker, &ids[0]).await;
    broker.stop().await;
}
