//! Retention (SPEC: retention): terminal jobs are deleted in the background once the retention period has passed,
//! in bounded batches, together with their idempotency keys; live jobs are never touched.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use tonic::transport::Channel;

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
    wait_until_deleted(&client, &finished).await;
    // The live job stays, and the deleted jobs' keys are free again: the same key makes a new job.
    assert_eq!(get_job(&mut client, &live).await.state(), pb::JobState::Queued);
    let again = client.enqueue(pb::EnqueueRequest { jobs: vec![keyed(0)] }).await.expect("enqueue").into_inner();
    assert!(again.jobs[0].created, "a deleted job's idempotency key is free again");
    assert_ne!(again.jobs[0].id, finished[0]);
    broker.stop().await;
}

/// Retention walks finished jobs one `(queue, state)` group at a time. A group that sorts first and holds only a
/// job still within the retention period must not stop the groups after it from being cleaned.
#[tokio::test]
async fn retention_reaches_every_queue_and_state_past_a_group_still_retained() {
    // The young job below finishes `retention * 2 / 3` after the old ones: that is the margin the test has between
    // the old ones' deletion and the young one's on a slow machine.
    let retention = Duration::from_secs(5);
    let mut settings = Settings::with_database(test_database().await);
    settings.retention = retention;
    settings.retention_interval = Duration::from_millis(100);
    settings.retention_batch = 2;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;

    // Groups (QUEUE, succeeded) and (QUEUE, failed).
    let mut old = enqueue(&mut client, (0..3).map(|_| pb::JobSpec::new(QUEUE, "k", vec![])).collect()).await;
    let mut worker = TestWorker::connect(client.clone(), "w", &[QUEUE], 3).await;
    for _ in 0..3 {
        let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
        assert_eq!(worker.succeed(&lease, b"done").await.expect("complete"), pb::JobState::Succeeded);
    }
    old.extend(enqueue(&mut client, vec![pb::JobSpec::new(QUEUE, "k", vec![])]).await);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    assert_eq!(worker.complete(&lease, failure("broken", true, None)).await.expect("complete"), pb::JobState::Failed);

    // Ages the jobs above: the group ("aaa", cancelled), first in index order, finishes this much later.
    tokio::time::sleep(retention * 2 / 3).await;
    let young = enqueue(&mut client, vec![pb::JobSpec::new("aaa", "k", vec![])]).await.remove(0);
    let cancelled = client.cancel_job(pb::CancelJobRequest { id: young.clone() }).await.expect("cancel").into_inner();
    assert_eq!(cancelled.job.expect("job").state(), pb::JobState::Cancelled);

    wait_until_deleted(&client, &old).await;
    assert_eq!(get_job(&mut client, &young).await.state(), pb::JobState::Cancelled, "still within retention");
    broker.stop().await;
}

/// Waits until retention has deleted each of these jobs (GetJob answers NOT_FOUND).
async fn wait_until_deleted(client: &BrokerServiceClient<Channel>, ids: &[String]) {
    for id in ids {
        wait_for("a finished job to be deleted by retention", Duration::from_secs(15), || {
            let (mut client, id) = (client.clone(), id.clone());
            async move {
                let answer = client.get_job(pb::GetJobRequest { id }).await;
                matches!(answer, Err(status) if status.code() == tonic::Code::NotFound).then_some(())
            }
        })
        .await;
    }
}
