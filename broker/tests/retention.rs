//! Retention (SPEC: retention): terminal jobs are deleted in the background once the retention period has passed,
//! in bounded batches, together with their idempotency keys; live jobs are never touched.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1 as pb;

const QUEUE: &str = "kept";

#[tokio::test]
async fn finished_jobs_are_deleted_after_the_retention_period_with_their_keys() {
    let mut settings = Settings::with_database(test_database().await);
    settings.retention = Duration::from_secs(1);
    settings.retention_interval = Duration::from_millis(100);
    settings.retention_batch = 2;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;

    let keyed = |i: usize| pb::JobSpec { idempotency_key: format!("key-{i}"), ..pb::JobSpec::new(QUEUE, "k", vec![]) };
    let finished = enqueue(&mut client, (0..5).map(keyed).collect()).await;
    let mut worker = TestWorker::connect(client.clone(), "w", &[QUEUE], 5).await;
    for _ in 0..5 {
        let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
        assert_eq!(worker.succeed(&lease, b"done").await.expect("complete"), pb::JobState::Succeeded);
    }
    worker.set_capacity(0).await;
    let live = enqueue(&mut client, vec![pb::JobSpec::new(QUEUE, "k", vec![])]).await.remove(0);

    // Kept until the retention period has passed.
    assert_eq!(get_job(&mut client, &finished[0]).await.state(), pb::JobState::Succeeded);
    for id in &finished {
        wait_for("a finished job to be deleted by retention", Duration::from_secs(15), || {
            let (mut client, id) = (client.clone(), id.clone());
            async move {
                let answer = client.get_job(pb::GetJobRequest { id }).await;
                matches!(answer, Err(status) if status.code() == tonic::Code::NotFound).then_some(())
            }
        })
        .await;
    }
    // The live job stays, and the deleted jobs' keys are free again: the same key makes a new job.
    assert_eq!(get_job(&mut client, &live).await.state(), pb::JobState::Queued);
    let again = client.enqueue(pb::EnqueueRequest { jobs: vec![keyed(0)] }).await.expect("enqueue").into_inner();
    assert!(again.jobs[0].created, "a deleted job's idempotency key is free again");
    assert_ne!(again.jobs[0].id, finished[0]);
    broker.stop().await;
}
