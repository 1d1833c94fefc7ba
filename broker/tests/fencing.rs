//! Fencing (SPEC: fencing and delivery): only a job's current lease can heartbeat or complete it. A worker whose
//! lease was reassigned is refused with ABORTED / `LEASE_LOST` and changes nothing; a lease past its deadline that
//! nobody has reassigned yet is still current, and so is a lease whose row another transaction changed while the
//! call waited for it.

mod common;

use std::time::Duration;

use broker::config::Settings;
use chrono::{DateTime, Utc};
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1 as pb;
use sqlx::PgPool;
use tonic::Code;
use tonic_types::StatusExt;

const QUEUE: &str = "fenced";

/// A job whose lease lasts `lease_ttl` and whose retries are due at once (a lost lease is a retryable failure).
fn short_lease(payload: &[u8], lease_ttl: Duration) -> pb::JobSpec {
    pb::JobSpec {
        lease_ttl: Some(duration(lease_ttl)),
        retry: Some(pb::RetryPolicy {
            initial_backoff: Some(duration(Duration::from_millis(1))),
            ..Default::default()
        }),
        ..pb::JobSpec::new(QUEUE, "work", payload.to_vec())
    }
}

/// The database clock, which every lease deadline is measured by.
async fn database_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(pool).await.expect("reading the database clock")
}

fn assert_lease_lost(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::Aborted, "{what}: {status:?}");
    let details = status.get_error_details();
    let info = details.error_info().unwrap_or_else(|| panic!("{what}: ABORTED without ErrorInfo: {status:?}"));
    assert_eq!(info.reason, "LEASE_LOST", "{what}");
}

#[tokio::test]
async fn a_worker_whose_lease_was_reassigned_can_neither_complete_nor_heartbeat() {
    let mut settings = Settings::with_database(test_database().await);
    settings.reaper_interval = Duration::from_millis(100);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let id = enqueue(&mut client, vec![short_lease(b"job", Duration::from_secs(1))]).await.remove(0);
    let first = a.assignment(Duration::from_secs(5)).await;
    assert_eq!(first.job.as_ref().map(|j| j.attempt), Some(1));
    // A stalls: no heartbeats, and it takes no more work, so the re-queued job can only go to B.
    a.set_capacity(0).await;

    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;
    let second = b.assignment(Duration::from_secs(6)).await;
    let job = second.job.as_ref().expect("a job");
    assert_eq!(job.id, id);
    assert_eq!(job.attempt, 2, "the reassigned lease is the second attempt");
    assert_eq!(job.last_error, "lease expired");
    assert_ne!(second.lease_id, first.lease_id, "a reassignment is a new lease");

    // A wakes up and tries every outcome with its old lease: each is refused and changes nothing.
    let refused = a.succeed(&first.lease_id, b"from A").await.expect_err("A's lease was reassigned");
    assert_lease_lost(&refused, "A's success");
    let refused = a.complete(&first.lease_id, failure("A failed", true, None)).await.expect_err("A's failure");
    assert_lease_lost(&refused, "A's failure");
    let refused = a.complete(&first.lease_id, release()).await.expect_err("A's release");
    assert_lease_lost(&refused, "A's release");
    let status = a.heartbeat(&first.lease_id, None).await;
    assert!(!status.active, "A's heartbeat must report its lease inactive: {status:?}");
    assert!(!status.cancel_requested);

    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state(), pb::JobState::Leased, "A changed the job");
    assert_eq!((job.attempt, job.worker_id.as_str()), (2, "worker-b"));
    assert!(job.result.is_empty() && job.finished_at.is_none(), "A changed the job: {job:?}");

    // B's lease is untouched by all of that.
    assert!(b.heartbeat(&second.lease_id, None).await.active, "B's lease is current");
    assert_eq!(b.succeed(&second.lease_id, b"from B").await.expect("B completes"), pb::JobState::Succeeded);

    let refused = a.succeed(&first.lease_id, b"from A, later").await.expect_err("A after B finished");
    assert_lease_lost(&refused, "A's success after B finished");
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state(), pb::JobState::Succeeded);
    assert_eq!(job.result, b"from B");
    assert_eq!(job.attempt, 2);
    a.expect_nothing(Duration::from_millis(300)).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_complete_after_the_deadline_but_before_reassignment_is_accepted() {
    let url = test_database().await;
    let mut settings = Settings::with_database(url.clone());
    // The reaper never runs during the test, so the expired lease is not reassigned.
    settings.reaper_interval = Duration::from_secs(3600);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let pool = PgPool::connect(&url).await.expect("connecting to the test database");

    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let id = enqueue(&mut client, vec![short_lease(b"job", Duration::from_secs(1))]).await.remove(0);
    let assignment = a.assignment(Duration::from_secs(5)).await;
    let deadline = instant(assignment.lease_expires_at.as_ref());

    let overdue = wait_for("the lease deadline to pass by the database clock", Duration::from_secs(5), || {
        let pool = pool.clone();
        async move {
            let now = database_now(&pool).await;
            (now > deadline + chrono::Duration::milliseconds(200)).then_some(now)
        }
    })
    .await;
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state(), pb::JobState::Leased, "nobody reassigned the lease");
    assert_eq!(instant(job.lease_expires_at.as_ref()), deadline, "the lease was not extended");
    println!("completing {} ms after the lease deadline", (overdue - deadline).num_milliseconds());

    let state = a.succeed(&assignment.lease_id, b"late but fine").await.expect("a late complete is accepted");
    assert_eq!(state, pb::JobState::Succeeded);
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state(), pb::JobState::Succeeded);
    assert_eq!(job.result, b"late but fine");
    assert_eq!(job.attempt, 1);
    broker.stop().await;
}

/// Holds `job`'s row in a transaction that changes it, runs `call` (which must wait for that row), and commits once
/// Postgres shows the call waiting: the call's statement then finds the row changed after its snapshot was taken.
async fn change_row_under<T: Send + 'static>(
    pool: &PgPool,
    lease_id: &str,
    call: impl Future<Output = T> + Send + 'static,
) -> T {
    let lease_id: uuid::Uuid = lease_id.parse().expect("a lease id is a UUID");
    let mut tx = pool.begin().await.expect("a transaction");
    let changed = sqlx::query("UPDATE jobs SET progress_message = 'changed meanwhile' WHERE lease_id = $1")
        .bind(lease_id)
        .execute(&mut *tx)
        .await
        .expect("changing the leased row");
    assert_eq!(changed.rows_affected(), 1, "the lease's row is in the table");
    let call = tokio::spawn(call);
    wait_for("the call to wait for the row lock", Duration::from_secs(5), || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .expect("reading pg_stat_activity");
            (waiting > 0).then_some(())
        }
    })
    .await;
    tx.commit().await.expect("committing the change");
    call.await.expect("the call's task")
}

#[tokio::test]
async fn a_current_lease_holds_when_its_row_changed_while_the_call_waited_for_it() {
    let url = test_database().await;
    let broker = TestBroker::start(Settings::with_database(url.clone())).await;
    let mut client = broker.client().await;
    let pool = PgPool::connect(&url).await.expect("connecting to the test database");
    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let id = enqueue(&mut client, vec![short_lease(b"job", Duration::from_secs(30))]).await.remove(0);
    let assignment = a.assignment(Duration::from_secs(5)).await;

    let lease_id = assignment.lease_id.clone();
    let mut beating = a.client.clone();
    let status = change_row_under(&pool, &assignment.lease_id, async move {
        let beat = pb::LeaseBeat { lease_id, progress: Some(pb::Progress { percent: 40, message: "beat".into() }) };
        beating.heartbeat(pb::HeartbeatRequest { leases: vec![beat] }).await.expect("heartbeat").into_inner()
    })
    .await;
    assert!(status.leases[0].active, "the current lease was reported inactive: {status:?}");
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.progress.map(|p| (p.percent, p.message)), Some((40, "beat".to_string())), "the beat was written");

    let lease_id = assignment.lease_id.clone();
    let mut completing = a.client.clone();
    let state = change_row_under(&pool, &assignment.lease_id, async move {
        let outcome = success(b"done");
        completing.complete(pb::CompleteRequest { lease_id, outcome: Some(outcome) }).await
    })
    .await;
    let state = state.expect("the current lease's Complete is accepted").into_inner().state();
    assert_eq!(state, pb::JobState::Succeeded);
    let job = get_job(&mut client, &id).await;
    assert_eq!((job.state(), job.result.as_slice()), (pb::JobState::Succeeded, &b"done"[..]));
    broker.stop().await;
}
