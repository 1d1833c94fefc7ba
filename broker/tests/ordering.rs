//! Dispatch over real gRPC: the order jobs are handed out in, scheduled jobs waiting for their time, pushes to
//! waiting workers, flow control (capacity never exceeded, capacity 0 drains) and several workers sharing a queue.

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use broker::config::Settings;
use common::{TestBroker, test_database, worker::*};
use jobbroker::v1::{self as pb, lease_response};
use sqlx::{Connection as _, PgConnection};

/// Long enough for a delivery that is due to arrive on a loaded machine.
const ARRIVES: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

fn at(time: SystemTime) -> prost_types::Timestamp {
    time.into()
}

fn payload(assignment: &pb::Assignment) -> String {
    let spec = assignment.job.as_ref().and_then(|job| job.spec.as_ref()).expect("an assigned job has its spec");
    String::from_utf8(spec.payload.clone()).expect("utf-8 payloads")
}

/// Completes `lease` successfully; panics if the broker does not accept it.
async fn finish(worker: &mut TestWorker, lease: &str) {
    let state = worker.succeed(lease, b"").await.unwrap_or_else(|status| panic!("completing {lease}: {status:?}"));
    assert_eq!(state, pb::JobState::Succeeded);
}

#[tokio::test]
async fn jobs_are_handed_out_by_priority_then_run_at_then_enqueue_order() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    let now = SystemTime::now();
    let ago = |secs: u64| Some(at(now - Duration::from_secs(secs)));
    let job = |name: &str, priority: i32, run_at: Option<prost_types::Timestamp>| pb::JobSpec {
        priority,
        run_at,
        ..pb::JobSpec::new("ordered", "work", name.as_bytes().to_vec())
    };
    // Enqueued in an order that matches none of the keys, in several RPCs, before any worker connects.
    enqueue(&mut client, vec![job("low", -1, ago(60)), job("tie-0", 0, ago(20))]).await;
    enqueue(&mut client, vec![job("p5-late", 5, ago(1)), job("tie-1", 0, ago(20)), job("old", 0, ago(30))]).await;
    enqueue(&mut client, vec![job("tie-2", 0, ago(20))]).await;
    enqueue(&mut client, vec![job("top", 1000, None), job("p5-early", 5, ago(10)), job("tie-3", 0, ago(20))]).await;
    enqueue(&mut client, vec![job("tie-4", 0, ago(20)), job("tie-5", 0, ago(20))]).await;
    let expected = ["top", "p5-early", "p5-late", "old", "tie-0", "tie-1", "tie-2", "tie-3", "tie-4", "tie-5", "low"];

    let mut worker = TestWorker::connect(client, "w1", &["ordered"], 1).await;
    let mut seen = Vec::new();
    for _ in expected {
        let assignment = worker.assignment(ARRIVES).await;
        seen.push(payload(&assignment));
        finish(&mut worker, &assignment.lease_id).await;
    }
    assert_eq!(seen, expected, "highest priority first, then earliest run_at, then enqueue order");
    worker.expect_nothing(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_scheduled_job_is_handed_out_at_its_run_at_and_not_before() {
    let mut settings = Settings::with_database(test_database().await);
    // Far longer than the test: the job must come from the broker's timer for the next due job, not the poll.
    settings.poll_interval = Duration::from_secs(30);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let mut worker = TestWorker::connect(client.clone(), "w1", &["later"], 1).await;

    let run_at = SystemTime::now() + Duration::from_millis(1500);
    let spec = pb::JobSpec { run_at: Some(at(run_at)), ..pb::JobSpec::new("later", "work", b"scheduled".to_vec()) };
    enqueue(&mut client, vec![spec]).await;

    // Quiet until shortly before run_at (less if the enqueue was slow); the arrival time is checked below too.
    let quiet = run_at.duration_since(SystemTime::now()).unwrap_or_default().saturating_sub(Duration::from_millis(300));
    worker.expect_nothing(quiet).await;
    let left = run_at.duration_since(SystemTime::now()).unwrap_or_default();
    let assignment = worker.assignment(left + Duration::from_secs(1)).await;
    let arrived = SystemTime::now();
    assert_eq!(payload(&assignment), "scheduled");
    // The database and this test read the same host clock; allow for microsecond rounding only.
    let early = run_at.duration_since(arrived).unwrap_or_default();
    assert!(early < Duration::from_millis(5), "the job arrived {early:?} before its run_at");
    let late = arrived.duration_since(run_at).unwrap_or_default();
    println!("scheduled job delivered {late:?} after its run_at");
    broker.stop().await;
}

#[tokio::test]
async fn a_job_enqueued_while_a_worker_waits_is_pushed_at_once() {
    let mut settings = Settings::with_database(test_database().await);
    // Far longer than the bound asserted below: only a push can deliver in time.
    settings.poll_interval = Duration::from_secs(30);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let mut worker = TestWorker::connect(client.clone(), "w1", &["fast"], 1).await;
    worker.expect_nothing(Duration::from_millis(200)).await;

    let mut latencies = Vec::new();
    for round in 0..5 {
        let started = Instant::now();
        enqueue(&mut client, vec![pb::JobSpec::new("fast", "work", format!("round {round}"))]).await;
        let assignment = worker.assignment(ARRIVES).await;
        let latency = started.elapsed();
        assert_eq!(payload(&assignment), format!("round {round}"));
        latencies.push(latency);
        finish(&mut worker, &assignment.lease_id).await;
    }
    println!("enqueue → assignment latencies: {latencies:?}");
    let worst = latencies.iter().max().copied().unwrap_or_default();
    assert!(worst < Duration::from_millis(500), "a waiting worker got a new job only after {worst:?}");
    broker.stop().await;
}

#[tokio::test]
async fn jobs_enqueued_for_an_idle_worker_are_leased_by_their_insert_best_first() {
    let database = test_database().await;
    let mut settings = Settings::with_database(database.clone());
    settings.poll_interval = Duration::from_secs(30);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let mut worker = TestWorker::connect(client.clone(), "idle", &["direct"], 2).await;
    // The stream's first claim found nothing: the worker is idle.
    worker.expect_nothing(Duration::from_millis(200)).await;

    let job = |name: &str, priority: i32| pb::JobSpec { priority, ..pb::JobSpec::new("direct", "work", name) };
    let ids = enqueue(&mut client, vec![job("p0", 0), job("p7", 7), job("p3", 3)]).await;
    let mut handed = Vec::new();
    for _ in 0..2 {
        let assignment = worker.assignment(ARRIVES).await;
        let sent = assignment.job.clone().expect("an assignment carries its job");
        // What the worker was sent is the job as stored (defaults, timestamps, lease), attempt 1, held by it.
        let stored = get_job(&mut client, &sent.id).await;
        assert_eq!(sent, stored, "the pushed job differs from the stored one");
        assert_eq!((stored.state(), stored.attempt, stored.worker_id.as_str()), (pb::JobState::Leased, 1, "idle"));
        assert_eq!(stored.lease_expires_at, assignment.lease_expires_at);
        handed.push((payload(&assignment), assignment.lease_id));
    }
    let names: HashSet<&str> = handed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, HashSet::from(["p7", "p3"]), "the two free slots take the two best jobs");
    worker.expect_nothing(QUIET).await;

    // Leased by the insert itself: all three rows are still the versions that insert's transaction wrote (a claim
    // would have written new versions of the leased two).
    let mut conn = PgConnection::connect(&database).await.expect("connecting to the test database");
    let writers: Vec<String> = sqlx::query_scalar("SELECT DISTINCT xmin::text FROM jobs WHERE id::text = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut conn)
        .await
        .expect("reading the rows' transaction ids");
    assert_eq!(writers.len(), 1, "the leased jobs were written again after their insert: {writers:?}");

    // A freed slot gets the job left queued, through a claim; and the leases work like any other.
    finish(&mut worker, &handed[0].1).await;
    assert_eq!(payload(&worker.assignment(ARRIVES).await), "p0");
    finish(&mut worker, &handed[1].1).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_stream_never_holds_more_leases_than_its_capacity_and_capacity_zero_drains() {
    let mut settings = Settings::with_database(test_database().await);
    // A quick safety-net poll gives an over-delivery bug every chance to show.
    settings.poll_interval = Duration::from_millis(100);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let jobs = (0..10).map(|i| pb::JobSpec::new("limited", "work", format!("job {i}"))).collect();
    enqueue(&mut client, jobs).await;

    let mut worker = TestWorker::connect(client, "w1", &["limited"], 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(worker.assignment(ARRIVES).await.lease_id);
    }
    worker.expect_nothing(QUIET).await;

    // A completion frees exactly one slot.
    finish(&mut worker, &held.remove(0)).await;
    held.push(worker.assignment(ARRIVES).await.lease_id);
    worker.expect_nothing(QUIET).await;

    // More capacity: exactly the difference arrives.
    worker.set_capacity(5).await;
    for _ in 0..2 {
        held.push(worker.assignment(ARRIVES).await.lease_id);
    }
    worker.expect_nothing(QUIET).await;
    assert_eq!(held.len(), 5);

    // Capacity 0 drains: the held leases can still be completed, and the freed slots are not refilled.
    worker.set_capacity(0).await;
    worker.expect_nothing(QUIET).await;
    for lease in held.drain(..) {
        finish(&mut worker, &lease).await;
    }
    worker.expect_nothing(Duration::from_secs(1)).await;

    // Back up: work resumes, up to the new capacity. 10 - 3 - 1 - 2 = 4 jobs are still queued.
    worker.set_capacity(2).await;
    for _ in 0..2 {
        held.push(worker.assignment(ARRIVES).await.lease_id);
    }
    worker.expect_nothing(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn workers_on_one_queue_split_the_work_and_no_job_goes_to_two() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    const JOBS: usize = 30;
    let mut workers = Vec::new();
    for w in 0..3 {
        workers.push(TestWorker::connect(client.clone(), &format!("w{w}"), &["shared"], 2).await);
    }
    let ids: HashSet<String> =
        enqueue(&mut client, (0..JOBS).map(|i| pb::JobSpec::new("shared", "work", format!("{i}"))).collect())
            .await
            .into_iter()
            .collect();

    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for mut worker in workers {
        let done = done.clone();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while done.load(Ordering::SeqCst) < JOBS {
                assert!(Instant::now() < deadline, "the workers did not finish {JOBS} jobs in 30 s");
                match worker.next_message(Duration::from_millis(100)).await {
                    Some(Ok(lease_response::Response::Assignment(assignment))) => {
                        let id = assignment.job.as_ref().expect("job").id.clone();
                        finish(&mut worker, &assignment.lease_id).await;
                        mine.push(id);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    None => {}
                    other => panic!("unexpected message {other:?}"),
                }
            }
            mine
        });
    }
    let mut delivered = Vec::new();
    let mut per_worker = Vec::new();
    while let Some(mine) = tasks.join_next().await {
        let mine = mine.expect("the worker task ran");
        per_worker.push(mine.len());
        delivered.extend(mine);
    }
    println!("jobs per worker: {per_worker:?}");
    assert_eq!(delivered.len(), JOBS, "every job was delivered exactly once in total");
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), ids, "no job went to two workers, none was missed");
    assert!(per_worker.iter().all(|&n| n > 0), "every worker got some of the work: {per_worker:?}");
    for id in &ids {
        assert_eq!(get_job(&mut client, id).await.attempt, 1, "job {id} ran once");
    }
    broker.stop().await;
}
