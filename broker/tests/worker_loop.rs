//! The Rust worker loop (`jobbroker::worker`) against a real broker: a worker running more jobs than one
//! Heartbeat may name keeps every lease, because it heartbeats them in slices the broker accepts.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::{
    v1 as pb,
    worker::{self, ActiveJob, Control, Outcome, WorkerOptions},
};
use sqlx::PgPool;

const QUEUE: &str = "wide";
/// More than the broker's default `--max-leases-per-heartbeat` (1000).
const JOBS: usize = 1200;
/// Short enough that the jobs outlive two leases unless heartbeats extend them.
const LEASE_TTL: Duration = Duration::from_secs(2);
const RUNS_FOR: Duration = Duration::from_millis(4500);

#[tokio::test]
async fn a_worker_running_more_jobs_than_one_heartbeat_names_keeps_every_lease() {
    let database = test_database().await;
    let broker = TestBroker::start(Settings::with_database(&database)).await;
    let mut client = broker.client().await;
    let ttl = prost_types::Duration { seconds: LEASE_TTL.as_secs() as i64, nanos: 0 };
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(1000) {
        let jobs = chunk
            .iter()
            .map(|i| pb::JobSpec { lease_ttl: Some(ttl), ..pb::JobSpec::new(QUEUE, "slow", i.to_le_bytes().to_vec()) })
            .collect();
        enqueue(&mut client, jobs).await;
    }
    let control = Control::default();
    let options = WorkerOptions::new([broker.url.as_str()], [QUEUE], JOBS as u32);
    let handler = |_job: ActiveJob| async {
        tokio::time::sleep(RUNS_FOR).await;
        Outcome::Success(Vec::new())
    };
    let loop_task = tokio::spawn(worker::run(options, handler, control.clone()));

    let pool = PgPool::connect(&database).await.expect("a pool");
    let counted = wait_for("every job to finish", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            let (finished, first_attempt): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded' AND attempt = 1) FROM finished_jobs",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (finished as usize == JOBS).then_some(first_attempt)
        }
    })
    .await;
    assert_eq!(counted as usize, JOBS, "every job succeeded on its first lease: none was lost for want of heartbeats");
    control.drain.cancel();
    loop_task.await.expect("the worker task").expect("the worker loop");
    broker.stop().await;
}
