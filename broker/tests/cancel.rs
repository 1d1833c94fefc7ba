//! Cancellation (SPEC: states, Cancel rows): a QUEUED job is cancelled at once; a LEASED job is marked, its holder
//! is told on its stream and in heartbeat replies, and it ends CANCELLED however the holder completes it or when
//! the lease is lost, never re-queued. Terminal, unknown and malformed ids are refused.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient, lease_response};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

const QUEUE: &str = "cancellable";

fn spec(payload: &[u8]) -> pb::JobSpec {
    pb::JobSpec::new(QUEUE, "work", payload.to_vec())
}

async fn cancel(client: &mut BrokerServiceClient<Channel>, id: &str) -> Result<pb::Job, Status> {
    let answer = client.cancel_job(pb::CancelJobRequest { id: id.into() }).await?;
    Ok(answer.into_inner().job.expect("CancelJob answers the job"))
}

fn settings(url: String) -> Settings {
    let mut settings = Settings::with_database(url);
    settings.reaper_interval = Duration::from_millis(100);
    settings
}

#[tokio::test]
async fn cancelling_a_queued_job_cancels_it_at_once() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let id = enqueue(&mut client, vec![spec(b"never run")]).await.remove(0);

    let answer = cancel(&mut client, &id).await.expect("cancel a queued job");
    assert_eq!(answer.state(), pb::JobState::Cancelled, "CancelJob answers the cancelled job");
    assert!(answer.finished_at.is_some());
    let job = get_job(&mut client, &id).await;
    assert_eq!((job.state(), job.attempt), (pb::JobState::Cancelled, 0));

    let mut worker = TestWorker::connect(client.clone(), "worker", &[QUEUE], 1).await;
    worker.expect_nothing(Duration::from_secs(1)).await;
    assert_eq!(get_job(&mut client, &id).await.state(), pb::JobState::Cancelled);
    broker.stop().await;
}

#[tokio::test]
async fn a_cancelled_leased_job_ends_cancelled_whatever_its_holder_answers() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let mut worker = TestWorker::connect(client.clone(), "worker", &[QUEUE], 1).await;

    let outcomes = [
        ("success", success(b"done anyway")),
        ("retryable failure", failure("interrupted", false, None)),
        ("non-retryable failure", failure("gave up", true, None)),
        ("release", release()),
    ];
    for (name, outcome) in outcomes {
        let id = enqueue(&mut client, vec![spec(name.as_bytes())]).await.remove(0);
        let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;

        let answer = cancel(&mut client, &id).await.expect("cancel a leased job");
        assert_eq!(answer.state(), pb::JobState::Leased, "{name}: a leased job stays LEASED until its holder answers");
        assert!(answer.cancel_requested, "{name}: CancelJob answers cancel_requested");

        match worker.next_message(Duration::from_secs(5)).await {
            Some(Ok(lease_response::Response::Cancel(notice))) => {
                assert_eq!((notice.lease_id.as_str(), notice.job_id.as_str()), (lease.as_str(), id.as_str()));
            }
            other => panic!("{name}: expected a CancelNotice on the holder's stream, got {other:?}"),
        }
        let status = worker.heartbeat(&lease, None).await;
        assert!(status.active && status.cancel_requested, "{name}: heartbeat reply {status:?}");

        let state = worker.complete(&lease, outcome).await.expect("the holder's answer is accepted");
        assert_eq!(state, pb::JobState::Cancelled, "{name}: Complete answers CANCELLED");
        let job = get_job(&mut client, &id).await;
        assert_eq!(job.state(), pb::JobState::Cancelled, "{name}");
        assert!(job.result.is_empty(), "{name}: the result of a cancelled job is not stored");
        assert!(job.finished_at.is_some(), "{name}");
        // Never re-queued: the worker's slot is free and it gets nothing.
        worker.expect_nothing(Duration::from_millis(300)).await;
        assert_eq!(get_job(&mut client, &id).await.state(), pb::JobState::Cancelled, "{name}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_cancelled_job_whose_lease_is_lost_ends_cancelled() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let mut a = TestWorker::connect(client.clone(), "worker-a", &[QUEUE], 1).await;
    let lost = pb::JobSpec {
        lease_ttl: Some(duration(Duration::from_secs(1))),
        retry: Some(pb::RetryPolicy {
            initial_backoff: Some(duration(Duration::from_millis(1))),
            ..Default::default()
        }),
        ..spec(b"abandoned")
    };
    let id = enqueue(&mut client, vec![lost]).await.remove(0);
    let lease = a.assignment(Duration::from_secs(5)).await.lease_id;
    let mut b = TestWorker::connect(client.clone(), "worker-b", &[QUEUE], 1).await;

    assert!(cancel(&mut client, &id).await.expect("cancel").cancel_requested);
    assert!(matches!(a.next_message(Duration::from_secs(5)).await, Some(Ok(lease_response::Response::Cancel(_)))));
    // A never answers: the lease expires and the reaper ends the job.
    let job = wait_for("the lost lease to end the job", Duration::from_secs(6), || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let job = get_job(&mut client, &id).await;
            assert!(
                matches!(job.state(), pb::JobState::Leased | pb::JobState::Cancelled),
                "a cancelled job went {:?}",
                job.state()
            );
            (job.state() == pb::JobState::Cancelled).then_some(job)
        }
    })
    .await;
    assert_eq!(job.attempt, 1);
    assert!(job.finished_at.is_some());

    b.expect_nothing(Duration::from_secs(1)).await;
    assert!(!a.heartbeat(&lease, None).await.active);
    let refused = a.succeed(&lease, b"too late").await.expect_err("the lease is gone");
    assert_eq!(refused.code(), Code::Aborted);
    assert_eq!(get_job(&mut client, &id).await.state(), pb::JobState::Cancelled);
    broker.stop().await;
}

#[tokio::test]
async fn cancel_refuses_terminal_unknown_and_malformed_ids() {
    let broker = TestBroker::start(settings(test_database().await)).await;
    let mut client = broker.client().await;
    let mut worker = TestWorker::connect(client.clone(), "worker", &[QUEUE], 1).await;

    let succeeded = enqueue(&mut client, vec![spec(b"finished")]).await.remove(0);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    worker.succeed(&lease, b"result").await.expect("complete");
    let failed = enqueue(&mut client, vec![spec(b"failed")]).await.remove(0);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    worker.complete(&lease, failure("broken", true, None)).await.expect("complete");
    let cancelled = enqueue(&mut client, vec![spec(b"cancelled")]).await.remove(0);
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    cancel(&mut client, &cancelled).await.expect("cancel");
    worker.complete(&lease, release()).await.expect("complete");

    for (id, state) in
        [(&succeeded, pb::JobState::Succeeded), (&failed, pb::JobState::Failed), (&cancelled, pb::JobState::Cancelled)]
    {
        let refused = cancel(&mut client, id).await.expect_err("a terminal job cannot be cancelled");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{state:?}: {refused:?}");
        let job = get_job(&mut client, id).await;
        assert_eq!(job.state(), state, "a refused cancel changed the job");
    }
    assert_eq!(get_job(&mut client, &succeeded).await.result, b"result");

    let unknown = uuid::Uuid::now_v7().to_string();
    let refused = cancel(&mut client, &unknown).await.expect_err("an unknown job");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");

    let refused = cancel(&mut client, "not-a-uuid").await.expect_err("a malformed id");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let details = refused.get_error_details();
    let fields: Vec<&str> = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["id"], "the BadRequest names the field: {refused:?}");
    broker.stop().await;
}
