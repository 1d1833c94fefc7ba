//! Detecting lost leases (SPEC: detecting lost leases): a closed stream gives its leases the reconnect grace (but
//! assignments that never left the broker go to another worker at once), a worker that reconnects within it keeps
//! them, a half-closed stream is not a closed one, a silent worker loses its lease after `lease_ttl` (and a worker
//! that never acknowledges the loss gets its slot back a heartbeat interval later), and an attempt past
//! `execution_timeout` is lost even while heartbeating.

mod common;

use std::time::{Duration, Instant};

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1 as pb;

const QUEUE: &str = "lossy";
const GRACE: Duration = Duration::from_secs(1);

/// Quick reaper, short grace: lost leases are found within a fraction of a second.
fn settings(url: String) -> Settings {
    let mut settings = Settings::with_database(url);
    settings.reconnect_grace = GRACE;
    settings.reaper_interval = Duration::from_millis(200);
    settings
}

/// A job with the given lease TTL (and a tiny retry backoff, though a lost lease is re-queued at once anyway).
fn spec(lease_ttl: Duration) -> pb::JobSpec {
    pb::JobSpec {
        lease_ttl: Some(duration(lease_ttl)),
        retry: Some(pb::RetryPolicy {
            initial_backoff: Some(duration(Duration::from_millis(1))),
            ..Default::default()
        }),
        ..pb::JobSpec::new(QUEUE, "work", b"payload".to_vec())
    }
}

#[tokio::test]
async fn a_vanished_workers_job_goes_to_another_worker_after_the_reconnect_grace() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    // A long TTL: only the closed stream can make this lease expire within the test.
    let id = enqueue(&mut client, vec![spec(Duration::from_secs(60))]).await.remove(0);
    let first = a.assignment(Duration::from_secs(5)).await;
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;

    let vanished = Instant::now();
    drop(a);
    let second = b.assignment(GRACE + Duration::from_secs(3)).await;
    let elapsed = vanished.elapsed();
    println!("re-leased {elapsed:?} after the worker vanished (reconnect grace {GRACE:?})");
    assert!(elapsed >= GRACE - Duration::from_millis(100), "re-leased before the reconnect grace: {elapsed:?}");
    assert!(elapsed <= GRACE + Duration::from_secs(1), "re-leased later than grace + 1 s: {elapsed:?}");

    let job = second.job.expect("a job");
    assert_eq!((job.id.as_str(), job.attempt), (id.as_str(), 2));
    assert_eq!(job.last_error, "lease expired");
    assert_ne!(second.lease_id, first.lease_id);
    assert_eq!(b.succeed(&second.lease_id, b"done").await.expect("B completes"), pb::JobState::Succeeded);
    broker.stop().await;
}

#[tokio::test]
async fn assignments_a_vanished_worker_never_received_go_to_another_worker_at_once() {
    let mut settings = settings(test_database().await);
    settings.reconnect_grace = Duration::from_secs(60);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;

    // 48 assignments of 256 KiB: far more than HTTP/2 flow control lets through to a worker that does not read, so
    // most of them still wait in the broker when the worker vanishes.
    const JOBS: usize = 48;
    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], JOBS as u32).await;
    let big = |_| pb::JobSpec { payload: vec![7; 256 * 1024], ..spec(Duration::from_secs(60)) };
    let ids = enqueue(&mut client, (0..JOBS).map(big).collect()).await;
    wait_for("every job leased to worker A", Duration::from_secs(10), || {
        let (mut client, ids) = (client.clone(), ids.clone());
        async move {
            for id in &ids {
                if get_job(&mut client, id).await.state() != pb::JobState::Leased {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let first = a.assignment(Duration::from_secs(5)).await;

    drop(a);
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], JOBS as u32).await;
    let mut received = Vec::new();
    while let Some(Ok(pb::lease_response::Response::Assignment(assignment))) =
        b.next_message(Duration::from_secs(3)).await
    {
        received.push(assignment.job.expect("a job"));
    }
    // Well within the 60 s grace: these were released, not expired, so the attempt was not used up.
    assert!(!received.is_empty(), "no unsent assignment was released when the stream closed");
    for job in &received {
        assert_eq!((job.attempt, job.last_error.as_str()), (1, ""), "job {} was not released", job.id);
    }
    // What A's transport took (A read the first one) waits out the grace: A may have it.
    let first_id = first.job.expect("a job").id;
    assert!(received.iter().all(|job| job.id != first_id), "a job worker A received was handed on before the grace");
    let still_with_a = get_job(&mut client, &first_id).await;
    assert_eq!((still_with_a.state(), still_with_a.worker_id.as_str()), (pb::JobState::Leased, "worker-a"));
    println!("{} of {JOBS} assignments had not gone out and were handed on at once", received.len());
    broker.stop().await;
}

#[tokio::test]
async fn a_worker_that_reconnects_within_the_grace_keeps_its_lease() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let id = enqueue(&mut client, vec![spec(Duration::from_secs(10))]).await.remove(0);
    let lease = a.assignment(Duration::from_secs(5)).await.lease_id;
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;

    drop(a);
    let register = pb::Register {
        worker_id: "worker-a".into(),
        queues: vec![QUEUE.into()],
        capacity: 1,
        held_lease_ids: vec![lease.clone()],
        ..Default::default()
    };
    let mut a = TestWorker::register(client.clone(), register).await.expect("A reconnects");
    let status = a.heartbeat(&lease, None).await;
    assert!(status.active, "the reconnected worker's lease is current: {status:?}");

    // Well past the grace of the old stream (and a few reaper passes), nobody else gets the job.
    b.expect_nothing(GRACE + Duration::from_millis(1500)).await;
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state(), pb::JobState::Leased);
    assert_eq!((job.attempt, job.worker_id.as_str()), (1, "worker-a"));

    let status = a.heartbeat(&lease, None).await;
    assert!(status.active, "the lease survived the grace: {status:?}");
    assert_eq!(a.succeed(&lease, b"resumed").await.expect("A completes"), pb::JobState::Succeeded);
    let job = get_job(&mut client, &id).await;
    assert_eq!((job.state(), job.attempt, job.result.as_slice()), (pb::JobState::Succeeded, 1, &b"resumed"[..]));
    b.expect_nothing(Duration::from_millis(300)).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_worker_that_half_closes_its_side_is_not_gone() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 2).await;
    a.half_close();
    let first_id = enqueue(&mut client, vec![spec(Duration::from_secs(30))]).await.remove(0);
    let first = a.assignment(Duration::from_secs(5)).await;
    let deadline = instant(first.lease_expires_at.as_ref());

    // Were the half-close taken for a closed stream, the lease would be lost after the grace and re-offered.
    a.expect_nothing(GRACE + Duration::from_millis(1500)).await;
    let job = get_job(&mut client, &first_id).await;
    assert_eq!((job.state(), job.attempt), (pb::JobState::Leased, 1));
    assert_eq!(instant(job.lease_expires_at.as_ref()), deadline, "the lease was shortened");

    let second_id = enqueue(&mut client, vec![spec(Duration::from_secs(30))]).await.remove(0);
    let second = a.assignment(Duration::from_secs(5)).await;
    assert_eq!(second.job.map(|j| j.id), Some(second_id), "a half-closed stream still receives jobs");
    assert!(a.heartbeat(&first.lease_id, None).await.active);
    assert_eq!(a.succeed(&first.lease_id, b"one").await.expect("complete"), pb::JobState::Succeeded);
    assert_eq!(a.succeed(&second.lease_id, b"two").await.expect("complete"), pb::JobState::Succeeded);
    broker.stop().await;
}

#[tokio::test]
async fn a_worker_that_leaves_at_capacity_0_gets_its_stream_ended_and_loses_nothing() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 2).await;
    enqueue(&mut client, vec![spec(Duration::from_secs(30))]).await;
    let running = a.assignment(Duration::from_secs(5)).await;
    let deadline = instant(running.lease_expires_at.as_ref());
    // A second job is assigned while the worker decides to stop: on the wire, not yet read.
    let in_flight_id = enqueue(&mut client, vec![spec(Duration::from_secs(30))]).await.remove(0);
    wait_for("the second job to be leased", Duration::from_secs(5), || {
        let mut client = client.clone();
        let id = in_flight_id.clone();
        async move { (get_job(&mut client, &id).await.state() == pb::JobState::Leased).then_some(()) }
    })
    .await;

    a.set_capacity(0).await;
    a.half_close();
    let in_flight = a.assignment(Duration::from_secs(5)).await;
    assert_eq!(in_flight.job.as_ref().map(|j| j.id.as_str()), Some(in_flight_id.as_str()));
    let started = Instant::now();
    assert!(a.next_message(Duration::from_secs(5)).await.is_none(), "nothing more arrives");
    assert!(started.elapsed() < Duration::from_secs(2), "the broker ended the stream of a leaving worker");

    // The in-flight job is given back unrun: no attempt used, no error, and another worker has it at once.
    assert_eq!(a.complete(&in_flight.lease_id, release()).await.expect("released"), pb::JobState::Queued);
    let job = get_job(&mut client, &in_flight_id).await;
    assert_eq!((job.attempt, job.last_error.as_str()), (0, ""));
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;
    let taken = b.assignment(Duration::from_secs(2)).await.job.expect("a job");
    assert_eq!((taken.id.as_str(), taken.attempt), (in_flight_id.as_str(), 1));

    // The running lease kept its deadline past the reconnect grace, and the worker still owns it.
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
    let status = a.heartbeat(&running.lease_id, None).await;
    assert!(status.active, "a leaving worker keeps its running leases: {status:?}");
    assert!(instant(status.lease_expires_at.as_ref()) >= deadline, "the lease was not shortened to the grace");
    assert_eq!(a.succeed(&running.lease_id, b"done").await.expect("complete"), pb::JobState::Succeeded);
    broker.stop().await;
}

#[tokio::test]
async fn a_hung_worker_loses_its_lease_after_the_lease_ttl() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let ttl = Duration::from_secs(1);

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let id = enqueue(&mut client, vec![spec(ttl)]).await.remove(0);
    let first = a.assignment(Duration::from_secs(5)).await;
    let leased = Instant::now();
    // Hung: the stream stays open with a free slot once the lease is reaped, but nothing is sent. The reaped
    // lease keeps that slot taken until A shows it noticed, so the job goes to B, not back to A.
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;

    let second = b.assignment(ttl + Duration::from_secs(3)).await;
    let elapsed = leased.elapsed();
    println!("re-leased {elapsed:?} after the lease was granted (lease_ttl {ttl:?})");
    assert!(elapsed >= ttl - Duration::from_millis(100), "re-leased before the lease expired: {elapsed:?}");
    let job = second.job.expect("a job");
    assert_eq!((job.id.as_str(), job.attempt, job.worker_id.as_str()), (id.as_str(), 2, "worker-b"));
    assert_eq!(job.last_error, "lease expired");

    a.expect_nothing(Duration::from_millis(300)).await;

    let status = a.heartbeat(&first.lease_id, None).await;
    assert!(!status.active, "the hung worker learns its lease is lost: {status:?}");
    // Having noticed, A's slot is free again: the next job (B is full) goes to A.
    let next = enqueue(&mut client, vec![spec(ttl)]).await.remove(0);
    let third = a.assignment(Duration::from_secs(5)).await;
    assert_eq!(third.job.expect("a job").id, next);
    broker.stop().await;
}

#[tokio::test]
async fn a_worker_that_forgets_a_lost_lease_gets_its_slot_back_a_heartbeat_interval_after_the_reap() {
    let mut settings = settings(test_database().await);
    settings.poll_interval = Duration::from_millis(100);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let ttl = Duration::from_millis(900);

    let mut a = TestWorker::connect(client.clone(), "forgetful", &[QUEUE], 1).await;
    let id = enqueue(&mut client, vec![spec(ttl)]).await.remove(0);
    let first = a.assignment(Duration::from_secs(5)).await;
    let leased = Instant::now();
    // A never heartbeats, completes or asks about the lease again: it forgot it. The reaped lease keeps A's only
    // slot for one heartbeat interval (ttl / 3), then frees it, and the re-queued job comes back to A.
    let second = a.assignment(Duration::from_secs(5)).await;
    let elapsed = leased.elapsed();
    assert!(elapsed >= ttl + ttl / 3 - Duration::from_millis(50), "the slot was freed at the reap: {elapsed:?}");
    let job = second.job.expect("a job");
    assert_eq!((job.id.as_str(), job.attempt), (id.as_str(), 2));
    assert_ne!(second.lease_id, first.lease_id);
    broker.stop().await;
}

#[tokio::test]
async fn an_attempt_past_its_execution_timeout_is_lost_even_while_heartbeating() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let timeout = Duration::from_secs(1);
    let ttl = Duration::from_secs(10);

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let spec = pb::JobSpec { execution_timeout: Some(duration(timeout)), ..spec(ttl) };
    let id = enqueue(&mut client, vec![spec]).await.remove(0);
    let first = a.assignment(Duration::from_secs(5)).await;
    let leased = Instant::now();
    a.set_capacity(0).await;
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;

    // A heartbeats diligently every 100 ms until B gets the job.
    let mut active_beats = 0;
    let second = loop {
        match b.next_message(Duration::from_millis(100)).await {
            Some(Ok(pb::lease_response::Response::Assignment(assignment))) => break assignment,
            Some(other) => panic!("expected an assignment, got {other:?}"),
            None => {}
        }
        assert!(leased.elapsed() < ttl, "the job was not re-leased within its lease_ttl");
        if a.heartbeat(&first.lease_id, None).await.active {
            active_beats += 1;
        }
    };
    let elapsed = leased.elapsed();
    println!("re-leased {elapsed:?} after the lease was granted (execution_timeout {timeout:?}, lease_ttl {ttl:?})");
    assert!(active_beats > 0, "A's heartbeats were never accepted");
    assert!(elapsed >= timeout - Duration::from_millis(100), "re-leased before the execution timeout: {elapsed:?}");
    assert!(elapsed < timeout + Duration::from_secs(2), "re-leased long after the execution timeout: {elapsed:?}");
    let job = second.job.expect("a job");
    assert_eq!((job.id.as_str(), job.attempt, job.worker_id.as_str()), (id.as_str(), 2, "worker-b"));
    assert_eq!(job.last_error, "lease expired: execution timeout exceeded");

    let status = a.heartbeat(&first.lease_id, None).await;
    assert!(!status.active, "a heartbeat after the timeout reports the lease inactive: {status:?}");
    let refused = a.succeed(&first.lease_id, b"too late").await.expect_err("the timed-out lease is gone");
    assert_eq!(refused.code(), tonic::Code::Aborted);
    assert_eq!(b.succeed(&second.lease_id, b"done").await.expect("B completes"), pb::JobState::Succeeded);
    broker.stop().await;
}
