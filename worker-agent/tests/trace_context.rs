//! The agent hands a job's W3C trace context to its handler: `TRACEPARENT`/`TRACESTATE` in a command's
//! environment (never the agent's own), `traceparent`/`tracestate` headers on an HTTP call.

mod support;

use std::time::Duration;

use jobbroker::v1::{self as pb, JobState};
use support::*;

const WAIT: Duration = Duration::from_secs(20);
const QUEUE: &str = "traced";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACESTATE: &str = "vendor=opaque";

/// Enqueues one job on [`QUEUE`], with the trace context headers when `traced`; returns its id.
async fn enqueue_job(broker: &TestBroker, traced: bool) -> String {
    let spec = pb::JobSpec::new(QUEUE, "trace", "payload");
    let mut request = tonic::Request::new(pb::EnqueueRequest { jobs: vec![spec] });
    if traced {
        request.metadata_mut().insert("traceparent", TRACEPARENT.parse().expect("ASCII"));
        request.metadata_mut().insert("tracestate", TRACESTATE.parse().expect("ASCII"));
    }
    let mut client = broker.client().await;
    client.enqueue(request).await.expect("enqueue").into_inner().jobs.remove(0).id
}

#[tokio::test]
async fn exec_sees_the_job_trace_context_in_its_environment() {
    let broker = start_broker().await;
    let script = r#"printf '%s|%s' "${TRACEPARENT:-none}" "${TRACESTATE:-none}""#;
    // The agent's own TRACEPARENT (from whatever started it) must not leak into an untraced job.
    let stale = "00-11111111111111111111111111111111-2222222222222222-01";
    let _agent = spawn_agent(&broker.url, &["--queue", QUEUE, "--exec", script], &[("TRACEPARENT", stale)]);
    let client = broker.client().await;

    let traced = enqueue_job(&broker, true).await;
    let done = wait_for_state(&client, &traced, JobState::Succeeded, WAIT).await;
    assert_eq!(String::from_utf8_lossy(&done.result), format!("{TRACEPARENT}|{TRACESTATE}"));

    let untraced = enqueue_job(&broker, false).await;
    let done = wait_for_state(&client, &untraced, JobState::Succeeded, WAIT).await;
    assert_eq!(String::from_utf8_lossy(&done.result), "none|none");
}

#[tokio::test]
async fn http_gets_the_job_trace_context_as_headers() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![Reply::ok("traced"), Reply::ok("untraced")]).await;
    let _agent = spawn_agent(&broker.url, &["--queue", QUEUE, "--capacity", "1", "--http", &server.url], &[]);
    let client = broker.client().await;

    let traced = enqueue_job(&broker, true).await;
    wait_for_state(&client, &traced, JobState::Succeeded, WAIT).await;
    let untraced = enqueue_job(&broker, false).await;
    wait_for_state(&client, &untraced, JobState::Succeeded, WAIT).await;
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].header("traceparent"), Some(TRACEPARENT));
    assert_eq!(requests[0].header("tracestate"), Some(TRACESTATE));
    assert_eq!((requests[1].header("traceparent"), requests[1].header("tracestate")), (None, None));
}
