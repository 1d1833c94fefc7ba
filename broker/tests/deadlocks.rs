//! A batch statement chosen by Postgres as a deadlock victim is run again by the store: the worker's heartbeat
//! succeeds instead of failing with an error (which once made workers forget jobs and stalled their slots).
//!
//! The deadlock is made on purpose: another transaction holds one of two leased rows, the heartbeat for both locks
//! the other and waits, then that transaction asks for the row the heartbeat holds. The scene is played with each
//! row held in turn; one of the two must deadlock.
//!
//! Between the broker's own batches there is no such cycle: every batch locks its rows in lease-id order, whatever
//! order its callers named them in.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1 as pb;
use sqlx::{Connection as _, PgConnection, PgPool};

const WAIT: Duration = Duration::from_secs(10);

async fn deadlocks(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(pool)
        .await
        .expect("reading the deadlock count")
}

/// Returns once some statement of this database (the heartbeat) waits for a lock.
async fn heartbeat_waits(pool: &PgPool) {
    wait_for("the heartbeat to wait for the held row", WAIT, || {
        let pool = pool.clone();
        async move {
            // pg_locks spans the cluster, where other tests run: only this database's backends count.
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        }
    })
    .await;
}

/// Holds `first`'s row, waits until the heartbeat of both leases is blocked, then asks for `second`'s row.
async fn play(url: &str, worker: &mut TestWorker, leases: [&str; 2], jobs: [&str; 2]) {
    let mut other = PgConnection::connect(url).await.expect("a second connection");
    sqlx::query("BEGIN").execute(&mut other).await.expect("begun");
    let lock = "SELECT 1 FROM jobs WHERE id = $1::uuid FOR UPDATE";
    sqlx::query(lock).bind(jobs[0]).execute(&mut other).await.expect("the first row locked");
    let pool = PgPool::connect(url).await.expect("a pool");
    let mut client = worker.client.clone();
    let beats = leases.iter().map(|l| pb::LeaseBeat { lease_id: l.to_string(), progress: None }).collect();
    let heartbeat = tokio::spawn(async move { client.heartbeat(pb::HeartbeatRequest { leases: beats }).await });
    heartbeat_waits(&pool).await;
    // Either this waits for the heartbeat (a deadlock, which Postgres breaks by aborting one side) or it is granted.
    let second = sqlx::query(lock).bind(jobs[1]).execute(&mut other).await;
    match second {
        Ok(_) => sqlx::query("COMMIT").execute(&mut other).await.map(|_| ()).expect("committed"),
        Err(_) => sqlx::query("ROLLBACK").execute(&mut other).await.map(|_| ()).expect("rolled back"),
    }
    let answer = heartbeat.await.expect("the heartbeat task").expect("the heartbeat succeeds").into_inner();
    assert!(answer.leases.iter().all(|l| l.active), "both leases still held: {answer:?}");
}

/// A broker with two jobs leased to one worker: `(broker, worker, [lease of job 0, lease of job 1], job ids)`.
async fn two_leases(url: &str) -> (TestBroker, TestWorker, [String; 2], Vec<String>) {
    let broker = TestBroker::start(Settings::with_database(url.to_owned())).await;
    let mut client = broker.client().await;
    let ids = enqueue(
        &mut client,
        vec![pb::JobSpec::new("locked", "k", b"a".to_vec()), pb::JobSpec::new("locked", "k", b"b".to_vec())],
    )
    .await;
    let mut worker = TestWorker::connect(client, "w", &["locked"], 2).await;
    let (first, second) = (worker.assignment(WAIT).await, worker.assignment(WAIT).await);
    let lease_of = |id: &str| {
        if first.job.as_ref().expect("job").id == id { first.lease_id.clone() } else { second.lease_id.clone() }
    };
    let leases = [lease_of(&ids[0]), lease_of(&ids[1])];
    (broker, worker, leases, ids)
}

#[tokio::test]
async fn a_heartbeat_chosen_as_deadlock_victim_is_retried() {
    let url = test_database().await;
    let (_broker, mut worker, leases, ids) = two_leases(&url).await;
    let pool = PgPool::connect(&url).await.expect("a pool");
    let before = deadlocks(&pool).await;

    play(&url, &mut worker, [&leases[0], &leases[1]], [&ids[1], &ids[0]]).await;
    play(&url, &mut worker, [&leases[0], &leases[1]], [&ids[0], &ids[1]]).await;

    wait_for("Postgres to count the deadlock it broke", WAIT, || {
        let pool = pool.clone();
        async move { (deadlocks(&pool).await > before).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_heartbeat_locks_its_rows_in_lease_order_whatever_order_it_names_them() {
    let url = test_database().await;
    let (_broker, worker, leases, ids) = two_leases(&url).await;
    // (lease, job) with the lower lease id first: the order every batch locks in.
    let mut pairs = [(&leases[0], &ids[0]), (&leases[1], &ids[1])];
    pairs.sort();
    let [(low_lease, low_job), (high_lease, high_job)] = pairs;

    let mut other = PgConnection::connect(&url).await.expect("a second connection");
    sqlx::query("BEGIN").execute(&mut other).await.expect("begun");
    let lock = "SELECT 1 FROM jobs WHERE id = $1::uuid FOR UPDATE NOWAIT";
    sqlx::query(lock).bind(low_job).execute(&mut other).await.expect("the low lease's row locked");
    let pool = PgPool::connect(&url).await.expect("a pool");
    let mut client = worker.client.clone();
    // Named high first: locking in the order given would take the high row, then wait for the low one.
    let beats = [high_lease, low_lease].map(|l| pb::LeaseBeat { lease_id: l.to_string(), progress: None });
    let request = pb::HeartbeatRequest { leases: beats.to_vec() };
    let heartbeat = tokio::spawn(async move { client.heartbeat(request).await });
    heartbeat_waits(&pool).await;
    // Waiting for the low row, the heartbeat holds nothing after it: the high row is free at once.
    let high = sqlx::query(lock).bind(high_job).execute(&mut other).await;
    sqlx::query("COMMIT").execute(&mut other).await.expect("committed");
    high.expect("the heartbeat held the high lease's row while it waited for the low one");
    let answer = heartbeat.await.expect("the heartbeat task").expect("the heartbeat succeeds").into_inner();
    assert!(answer.leases.iter().all(|l| l.active), "both leases still held: {answer:?}");
}
