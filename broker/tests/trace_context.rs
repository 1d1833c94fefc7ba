//! W3C trace context: the `traceparent` and `tracestate` headers of an Enqueue request are stored with every job
//! of that request and handed back by GetJob and with the worker's assignment (also after the job finished, and
//! after an admin retry); a malformed `traceparent` is ignored, and its `tracestate` with it.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{
    TestBroker, test_database,
    worker::{TestWorker, failure, get_job},
};
use jobbroker::v1::{self as pb, admin_service_client::AdminServiceClient, broker_service_client::BrokerServiceClient};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// Enqueues `jobs` jobs on `queue` in one request carrying `headers`; returns their ids.
async fn enqueue_with(
    client: &mut BrokerServiceClient<Channel>,
    queue: &str,
    jobs: usize,
    headers: &[(&'static str, &str)],
) -> Vec<String> {
    let specs = (0..jobs).map(|i| pb::JobSpec::new(queue, "traced", format!("job {i}").into_bytes())).collect();
    let mut request = tonic::Request::new(pb::EnqueueRequest { jobs: specs });
    for (name, value) in headers {
        request.metadata_mut().append(*name, value.parse().expect("an ASCII header value"));
    }
    let answer = client.enqueue(request).await.expect("enqueue").into_inner();
    answer.jobs.into_iter().map(|job| job.id).collect()
}

#[tokio::test]
async fn the_enqueue_trace_context_reaches_get_job_and_the_worker() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    let headers = [("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)];
    let ids = enqueue_with(&mut client, "traced", 2, &headers).await;
    for id in &ids {
        let job = get_job(&mut client, id).await;
        assert_eq!((job.traceparent.as_str(), job.tracestate.as_str()), (TRACEPARENT, TRACESTATE));
    }

    // Both are run and fail for good; an operator retries one, which keeps its trace context.
    let mut worker = TestWorker::connect(broker.client().await, "w", &["traced"], 2).await;
    for _ in &ids {
        let assignment = worker.assignment(WAIT).await;
        let job = assignment.job.expect("a job");
        assert_eq!((job.traceparent.as_str(), job.tracestate.as_str()), (TRACEPARENT, TRACESTATE));
        let state = worker.complete(&assignment.lease_id, failure("broken", true, None)).await.expect("complete");
        assert_eq!(state, pb::JobState::Failed);
    }
    let finished = get_job(&mut client, &ids[0]).await;
    assert_eq!(finished.traceparent, TRACEPARENT, "a finished job keeps its trace context");
    let mut admin = AdminServiceClient::new(broker.channel().await);
    admin.retry_job(pb::RetryJobRequest { id: ids[0].clone() }).await.expect("admin retry");
    let retried = worker.assignment(WAIT).await.job.expect("a job");
    assert_eq!(retried.id, ids[0]);
    assert_eq!((retried.traceparent.as_str(), retried.tracestate.as_str()), (TRACEPARENT, TRACESTATE));
    broker.stop().await;
}

#[tokio::test]
async fn a_malformed_or_missing_traceparent_is_ignored() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    let upper = TRACEPARENT.to_uppercase();
    let cases: [&[(&'static str, &str)]; 4] = [
        &[],
        &[("traceparent", "not-a-traceparent"), ("tracestate", TRACESTATE)],
        &[("traceparent", &upper)],
        &[("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
    ];
    for headers in cases {
        let id = enqueue_with(&mut client, "untraced", 1, headers).await.remove(0);
        let job = get_job(&mut client, &id).await;
        assert_eq!((job.traceparent.as_str(), job.tracestate.as_str()), ("", ""), "with headers {headers:?}");
    }
    // A valid traceparent without tracestate.
    let id = enqueue_with(&mut client, "untraced", 1, &[("traceparent", TRACEPARENT)]).await.remove(0);
    let job = get_job(&mut client, &id).await;
    assert_eq!((job.traceparent.as_str(), job.tracestate.as_str()), (TRACEPARENT, ""));
    broker.stop().await;
}
