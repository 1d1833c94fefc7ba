//! Completions sent on the Lease stream: applied and fenced exactly as the Complete RPC, answered on the stream
//! in a CompleteAnswer, and a bad or late completion is answered with the error Complete would return without
//! ending the stream.

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, worker::*};
use jobbroker::v1 as pb;
use tonic::Code;

const QUEUE: &str = "streamed";
const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn completions_on_the_lease_stream_are_applied_fenced_and_answered_on_it() {
    let mut settings = Settings::with_database(test_database().await);
    settings.limits.max_payload_bytes = 64;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let mut worker = TestWorker::connect(client.clone(), "streamer", &[QUEUE], 2).await;
    let ids = enqueue(
        &mut client,
        vec![pb::JobSpec::new(QUEUE, "a", b"1".to_vec()), pb::JobSpec::new(QUEUE, "b", b"2".to_vec())],
    )
    .await;
    let first = worker.assignment(WAIT).await;
    let second = worker.assignment(WAIT).await;
    let lease_of = |id: &str| if first.job.as_ref().expect("job").id == id { &first } else { &second };
    let (one, two) = (lease_of(&ids[0]).lease_id.clone(), lease_of(&ids[1]).lease_id.clone());

    worker.complete_on_stream(&one, success(b"done")).await;
    let answer = worker.completed(WAIT).await;
    assert_eq!((answer.lease_id.as_str(), answer.error_code), (one.as_str(), 0), "{answer:?}");
    assert_eq!(answer.state(), pb::JobState::Succeeded);
    let job = get_job(&mut client, &ids[0]).await;
    assert_eq!((job.state(), job.result.as_slice()), (pb::JobState::Succeeded, &b"done"[..]));

    // The same completion again: the lease is no longer current.
    worker.complete_on_stream(&one, success(b"again")).await;
    let answer = worker.completed(WAIT).await;
    assert_eq!(Code::from_i32(answer.error_code), Code::Aborted, "{answer:?}");
    assert_eq!(get_job(&mut client, &ids[0]).await.result, b"done", "a repeat changes nothing");

    // A result over the limit is refused by name, the job stays leased, and the stream keeps working.
    worker.complete_on_stream(&two, success(&[7; 65])).await;
    let answer = worker.completed(WAIT).await;
    assert_eq!(Code::from_i32(answer.error_code), Code::InvalidArgument, "{answer:?}");
    assert!(answer.error_message.contains("success.result"), "{answer:?}");
    assert_eq!(get_job(&mut client, &ids[1]).await.state(), pb::JobState::Leased);
    worker.complete_on_stream("not-a-lease", release()).await;
    let answer = worker.completed(WAIT).await;
    assert_eq!((Code::from_i32(answer.error_code), answer.lease_id.as_str()), (Code::InvalidArgument, "not-a-lease"));
    assert!(answer.error_message.contains("lease_id"), "{answer:?}");

    worker.complete_on_stream(&two, failure("broken", true, None)).await;
    let answer = worker.completed(WAIT).await;
    assert_eq!((answer.error_code, answer.state()), (0, pb::JobState::Failed), "{answer:?}");
    assert_eq!(get_job(&mut client, &ids[1]).await.last_error, "broken");

    // Both slots were freed by the stream completions: two new jobs are pushed at once.
    let more = enqueue(
        &mut client,
        vec![pb::JobSpec::new(QUEUE, "c", b"3".to_vec()), pb::JobSpec::new(QUEUE, "d", b"4".to_vec())],
    )
    .await;
    let mut pushed =
        vec![worker.assignment(WAIT).await.job.expect("job").id, worker.assignment(WAIT).await.job.expect("job").id];
    pushed.sort();
    let mut expected = more.clone();
    expected.sort();
    assert_eq!(pushed, expected);
    broker.stop().await;
}
