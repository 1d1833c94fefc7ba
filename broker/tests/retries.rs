//! Retries (SPEC: states, retries): a retryable failure re-queues the job after an exponential backoff with jitter
//! (or the failure's `retry_after`), a non-retryable failure or the last attempt fails it for good, and a release
//! gives the job back at once without using up an attempt.

mod common;

use std::time::Duration;

use broker::config::Settings;
use chrono::{DateTime, Utc};
use common::{TestBroker, test_database, worker::*};
use jobbroker::v1 as pb;
use sqlx::PgPool;

const QUEUE: &str = "retried";
/// The default lease TTL the jobs here keep, to recover the claim instant from an assignment's deadline.
const LEASE_TTL: Duration = Duration::from_secs(30);

fn ms(millis: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(millis)
}

/// The database clock, which every `run_at` is set by.
async fn database_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(pool).await.expect("reading the database clock")
}

fn spec(max_attempts: u32, initial_backoff: Duration, multiplier: f64) -> pb::JobSpec {
    pb::JobSpec {
        max_attempts,
        lease_ttl: Some(duration(LEASE_TTL)),
        retry: Some(pb::RetryPolicy {
            initial_backoff: Some(duration(initial_backoff)),
            max_backoff: None,
            multiplier,
        }),
        ..pb::JobSpec::new(QUEUE, "flaky", b"payload".to_vec())
    }
}

struct Setup {
    broker: TestBroker,
    client: jobbroker::v1::broker_service_client::BrokerServiceClient<tonic::transport::Channel>,
    pool: PgPool,
}

async fn setup(settings: impl FnOnce(&mut Settings)) -> Setup {
    let url = test_database().await;
    let mut values = Settings::with_database(url.clone());
    settings(&mut values);
    let broker = TestBroker::start(values).await;
    let client = broker.client().await;
    let pool = PgPool::connect(&url).await.expect("connecting to the test database");
    Setup { broker, client, pool }
}

/// Fails the lease retryably and returns the job's new `run_at` and the database-clock window the failure fell in.
async fn fail_and_read_run_at(
    setup: &mut Setup,
    worker: &mut TestWorker,
    lease: &str,
    id: &str,
    outcome: pb::complete_request::Outcome,
) -> (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) {
    let before = database_now(&setup.pool).await;
    let state = worker.complete(lease, outcome).await.expect("the failure is recorded");
    let after = database_now(&setup.pool).await;
    assert_eq!(state, pb::JobState::Queued, "a retryable failure re-queues the job");
    let job = get_job(&mut setup.client, id).await;
    assert_eq!(job.state(), pb::JobState::Queued);
    (instant(job.run_at.as_ref()), before, after)
}

#[tokio::test]
async fn a_retryable_failure_is_retried_after_an_exponential_backoff() {
    let mut setup = setup(|_| {}).await;
    let mut worker = TestWorker::connect(setup.client.clone(), "worker", &[QUEUE], 1).await;
    let id = enqueue(&mut setup.client, vec![spec(5, Duration::from_millis(500), 2.0)]).await.remove(0);
    let mut lease = worker.assignment(Duration::from_secs(5)).await.lease_id;

    // attempt 1 fails: 500 ms less up to 20 % jitter; attempt 2 fails: 1 s less up to 20 %.
    for (attempt, full) in [(1, 500), (2, 1000)] {
        let message = format!("boom {attempt}");
        let (run_at, before, after) =
            fail_and_read_run_at(&mut setup, &mut worker, &lease, &id, failure(&message, false, None)).await;
        let earliest = before + ms(full * 4 / 5 - 1);
        let latest = after + ms(full);
        println!("attempt {attempt}: retry {} ms after the failure", (run_at - before).num_milliseconds());
        assert!(
            earliest <= run_at && run_at <= latest,
            "attempt {attempt}: run_at {run_at} outside [{earliest}, {latest}] (backoff {full} ms with jitter)"
        );

        // Not handed out before run_at (a margin short of it, by the database clock)...
        let left = (run_at - database_now(&setup.pool).await - ms(50)).to_std().unwrap_or_default();
        worker.expect_nothing(left).await;
        // ...and handed out once it is due.
        let next = worker.assignment(Duration::from_secs(3)).await;
        let claimed_at = instant(next.lease_expires_at.as_ref()) - chrono::Duration::from_std(LEASE_TTL).unwrap();
        assert!(claimed_at >= run_at, "attempt {attempt}: leased at {claimed_at}, before run_at {run_at}");
        let job = next.job.expect("a job");
        assert_eq!((job.id.as_str(), job.attempt), (id.as_str(), attempt + 1));
        assert_eq!(job.last_error, message);
        lease = next.lease_id;
    }
    assert_eq!(worker.succeed(&lease, b"third time").await.expect("complete"), pb::JobState::Succeeded);
    setup.broker.stop().await;
}

#[tokio::test]
async fn retry_after_wins_over_the_backoff() {
    let mut setup = setup(|_| {}).await;
    let mut worker = TestWorker::connect(setup.client.clone(), "worker", &[QUEUE], 1).await;

    // Shorter than the backoff: the job comes back after retry_after, long before the 8-10 s backoff.
    let id = enqueue(&mut setup.client, vec![spec(5, Duration::from_secs(10), 2.0)]).await.remove(0);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    let retry_after = Some(Duration::from_millis(300));
    let (run_at, before, after) =
        fail_and_read_run_at(&mut setup, &mut worker, &lease, &id, failure("busy", false, retry_after)).await;
    assert!(before + ms(300) <= run_at && run_at <= after + ms(300), "run_at {run_at} is not failure + 300 ms");
    let next = worker.assignment(Duration::from_secs(3)).await;
    assert_eq!(next.job.as_ref().map(|j| (j.id.as_str(), j.attempt)), Some((id.as_str(), 2)));
    assert_eq!(worker.succeed(&next.lease_id, b"ok").await.expect("complete"), pb::JobState::Succeeded);

    // Longer than the backoff: retry_after still decides.
    let id = enqueue(&mut setup.client, vec![spec(5, Duration::from_millis(1), 2.0)]).await.remove(0);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    let retry_after = Some(Duration::from_secs(60));
    let (run_at, before, after) =
        fail_and_read_run_at(&mut setup, &mut worker, &lease, &id, failure("later", false, retry_after)).await;
    assert!(before + ms(60_000) <= run_at && run_at <= after + ms(60_000), "run_at {run_at} is not failure + 60 s");
    worker.expect_nothing(Duration::from_millis(500)).await;
    setup.broker.stop().await;
}

#[tokio::test]
async fn a_non_retryable_failure_fails_the_job_for_good() {
    let mut setup = setup(|_| {}).await;
    let mut worker = TestWorker::connect(setup.client.clone(), "worker", &[QUEUE], 1).await;
    let id = enqueue(&mut setup.client, vec![spec(25, Duration::from_millis(1), 2.0)]).await.remove(0);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;

    let state = worker.complete(&lease, failure("malformed payload", true, None)).await.expect("recorded");
    assert_eq!(state, pb::JobState::Failed);
    let job = get_job(&mut setup.client, &id).await;
    assert_eq!((job.state(), job.attempt), (pb::JobState::Failed, 1));
    assert_eq!(job.last_error, "malformed payload");
    assert!(job.finished_at.is_some());
    worker.expect_nothing(Duration::from_millis(500)).await;
    setup.broker.stop().await;
}

#[tokio::test]
async fn a_job_fails_for_good_when_its_attempts_run_out() {
    let mut setup = setup(|_| {}).await;
    let mut worker = TestWorker::connect(setup.client.clone(), "worker", &[QUEUE], 1).await;
    let id = enqueue(&mut setup.client, vec![spec(2, Duration::from_millis(1), 2.0)]).await.remove(0);

    let first = worker.assignment(Duration::from_secs(5)).await;
    let state = worker.complete(&first.lease_id, failure("first", false, None)).await.expect("recorded");
    assert_eq!(state, pb::JobState::Queued, "attempt 1 of 2 is retried");
    let second = worker.assignment(Duration::from_secs(3)).await;
    assert_eq!(second.job.as_ref().map(|j| j.attempt), Some(2));
    let state = worker.complete(&second.lease_id, failure("second", false, None)).await.expect("recorded");
    assert_eq!(state, pb::JobState::Failed, "attempt 2 of 2 is the last");

    let job = get_job(&mut setup.client, &id).await;
    assert_eq!((job.state(), job.attempt), (pb::JobState::Failed, 2));
    assert_eq!(job.last_error, "second");
    worker.expect_nothing(Duration::from_millis(500)).await;
    setup.broker.stop().await;
}

#[tokio::test]
async fn a_release_gives_the_attempt_back_and_the_job_is_offered_again_at_once() {
    // Neither the backoff (10 s) nor the poll (60 s) can explain a prompt re-offer.
    let mut setup = setup(|settings| settings.poll_interval = Duration::from_secs(60)).await;
    let mut worker = TestWorker::connect(setup.client.clone(), "worker", &[QUEUE], 1).await;
    let id = enqueue(&mut setup.client, vec![spec(2, Duration::from_secs(10), 2.0)]).await.remove(0);
    let mut lease = worker.assignment(Duration::from_secs(5)).await;

    for round in 1..=3 {
        assert_eq!(lease.job.as_ref().map(|j| j.attempt), Some(1), "round {round}: the same attempt again");
        let before = database_now(&setup.pool).await;
        let state = worker.complete(&lease.lease_id, release()).await.expect("the release is recorded");
        assert_eq!(state, pb::JobState::Queued, "Complete answers QUEUED for a release");
        let next = worker.assignment(Duration::from_secs(2)).await;
        let claimed_at = instant(next.lease_expires_at.as_ref()) - chrono::Duration::from_std(LEASE_TTL).unwrap();
        let delay = claimed_at - before;
        println!("round {round}: re-offered {} ms after the release", delay.num_milliseconds());
        assert!(delay < ms(1000), "round {round}: re-offered {delay} after the release, not at once");
        lease = next;
    }

    // Three releases used up nothing: with max_attempts 2, a retryable failure still re-queues the job.
    let state = worker.complete(&lease.lease_id, failure("real failure", false, None)).await.expect("recorded");
    assert_eq!(state, pb::JobState::Queued, "releases consumed attempts");
    let job = get_job(&mut setup.client, &id).await;
    assert_eq!((job.state(), job.attempt, job.last_error.as_str()), (pb::JobState::Queued, 1, "real failure"));
    setup.broker.stop().await;
}
