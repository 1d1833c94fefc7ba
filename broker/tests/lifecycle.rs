//! The whole life of a job over real gRPC: enqueue → lease → heartbeat with progress → complete, seen through
//! GetJob and WatchJob.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for};
use jobbroker::v1::{self as pb, lease_request, lease_response};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

fn register(worker: &str, queues: &[&str], capacity: u32) -> pb::LeaseRequest {
    pb::LeaseRequest {
        request: Some(lease_request::Request::Register(pb::Register {
            worker_id: worker.into(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            capacity,
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn a_job_goes_from_enqueue_to_success_and_watchers_see_every_state() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;

    let enqueued = client
        .enqueue(pb::EnqueueRequest { jobs: vec![pb::JobSpec::new("emails", "send", b"hello".to_vec())] })
        .await
        .expect("enqueue")
        .into_inner();
    let id = enqueued.jobs[0].id.clone();
    assert!(enqueued.jobs[0].created);

    let mut watch = client.watch_job(pb::WatchJobRequest { id: id.clone() }).await.expect("watch").into_inner();
    let first = watch.next().await.expect("a first state").expect("ok").job.expect("job");
    assert_eq!(first.state(), pb::JobState::Queued);

    let (send, receive) = mpsc::channel(4);
    send.send(register("w1", &["emails"], 1)).await.unwrap();
    let mut assignments = client.lease(ReceiverStream::new(receive)).await.expect("lease").into_inner();
    let assignment = match assignments.next().await.expect("an assignment").expect("ok").response {
        Some(lease_response::Response::Assignment(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    };
    let job = assignment.job.clone().expect("job");
    assert_eq!(job.id, id);
    assert_eq!(job.attempt, 1);
    assert_eq!(job.spec.as_ref().unwrap().payload, b"hello");

    let leased = watch.next().await.expect("leased").expect("ok").job.unwrap();
    assert_eq!(leased.state(), pb::JobState::Leased);

    let beat = client
        .heartbeat(pb::HeartbeatRequest {
            leases: vec![pb::LeaseBeat {
                lease_id: assignment.lease_id.clone(),
                progress: Some(pb::Progress { percent: 40, message: "halfway-ish".into() }),
            }],
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(beat.leases[0].active);
    let with_progress = watch.next().await.expect("progress").expect("ok").job.unwrap();
    assert_eq!(with_progress.progress.as_ref().map(|p| p.percent), Some(40));

    let done = client
        .complete(pb::CompleteRequest {
            lease_id: assignment.lease_id.clone(),
            outcome: Some(pb::complete_request::Outcome::Success(pb::Success { result: b"sent".to_vec() })),
        })
        .await
        .expect("complete")
        .into_inner();
    assert_eq!(done.state(), pb::JobState::Succeeded);

    let last = watch.next().await.expect("terminal").expect("ok").job.unwrap();
    assert_eq!(last.state(), pb::JobState::Succeeded);
    assert!(watch.next().await.is_none(), "the watch ends after the terminal state");

    let job = client.get_job(pb::GetJobRequest { id: id.clone() }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.state(), pb::JobState::Succeeded);
    assert_eq!(job.result, b"sent");
    assert_eq!(job.progress.map(|p| p.message), Some("halfway-ish".into()));
    assert!(job.finished_at.is_some());

    // A zombie completing the same lease again changes nothing.
    let again = client
        .complete(pb::CompleteRequest {
            lease_id: assignment.lease_id,
            outcome: Some(pb::complete_request::Outcome::Success(pb::Success { result: b"twice".to_vec() })),
        })
        .await
        .expect_err("second completion");
    assert_eq!(again.code(), tonic::Code::Aborted);
    let job = wait_for("the job to stay succeeded", Duration::from_secs(5), || {
        let mut client = client.clone();
        let id = id.clone();
        async move { client.get_job(pb::GetJobRequest { id }).await.ok().and_then(|r| r.into_inner().job) }
    })
    .await;
    assert_eq!(job.result, b"sent");
    broker.stop().await;
}
