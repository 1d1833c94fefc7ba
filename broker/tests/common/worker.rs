//! A hand-driven worker for tests: opens a Lease stream, receives assignments and cancel notices one at a time,
//! and heartbeats or completes exactly when the test says so (nothing happens in the background).

use std::time::Duration;

use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient, lease_request, lease_response};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Status, Streaming, transport::Channel};

/// One worker's Lease stream plus a client for its unary calls.
pub struct TestWorker {
    pub client: BrokerServiceClient<Channel>,
    /// Dropping it half-closes the worker's side of the stream.
    requests: Option<mpsc::Sender<pb::LeaseRequest>>,
    responses: Streaming<pb::LeaseResponse>,
}

impl TestWorker {
    /// Registers `worker_id` on `queues` with `capacity`.
    pub async fn connect(
        client: BrokerServiceClient<Channel>,
        worker_id: &str,
        queues: &[&str],
        capacity: u32,
    ) -> Self {
        Self::register(
            client,
            pb::Register {
                worker_id: worker_id.into(),
                queues: queues.iter().map(|q| q.to_string()).collect(),
                capacity,
                ..Default::default()
            },
        )
        .await
        .expect("the Lease stream opens")
    }

    /// Sends `register` as the first message; errors are the broker's answer to it.
    pub async fn register(mut client: BrokerServiceClient<Channel>, register: pb::Register) -> Result<Self, Status> {
        let (requests, receive) = mpsc::channel(16);
        let first = pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) };
        requests.send(first).await.expect("the request channel is open");
        let responses = client.lease(ReceiverStream::new(receive)).await?.into_inner();
        Ok(TestWorker { client, requests: Some(requests), responses })
    }

    pub async fn set_capacity(&self, capacity: u32) {
        let message =
            pb::LeaseRequest { request: Some(lease_request::Request::Capacity(pb::SetCapacity { capacity })) };
        self.requests.as_ref().expect("stream open").send(message).await.expect("the stream is open");
    }

    /// The next message from the broker, or `None` if none arrives within `wait` (or the stream ended).
    pub async fn next_message(&mut self, wait: Duration) -> Option<Result<lease_response::Response, Status>> {
        match tokio::time::timeout(wait, self.responses.next()).await {
            Ok(Some(Ok(pb::LeaseResponse { response: Some(response) }))) => Some(Ok(response)),
            Ok(Some(Ok(_))) => panic!("the broker sent an empty LeaseResponse"),
            Ok(Some(Err(status))) => Some(Err(status)),
            Ok(None) | Err(_) => None,
        }
    }

    /// The next assignment within `wait`; panics on anything else.
    pub async fn assignment(&mut self, wait: Duration) -> pb::Assignment {
        match self.next_message(wait).await {
            Some(Ok(lease_response::Response::Assignment(assignment))) => assignment,
            other => panic!("expected an assignment within {wait:?}, got {other:?}"),
        }
    }

    /// Asserts that no assignment arrives within `wait`.
    pub async fn expect_nothing(&mut self, wait: Duration) {
        if let Some(message) = self.next_message(wait).await {
            panic!("expected no message for {wait:?}, got {message:?}");
        }
    }

    pub async fn heartbeat(&mut self, lease_id: &str, progress: Option<pb::Progress>) -> pb::LeaseStatus {
        let request = pb::HeartbeatRequest { leases: vec![pb::LeaseBeat { lease_id: lease_id.into(), progress }] };
        let mut answer = self.client.heartbeat(request).await.expect("heartbeat").into_inner();
        answer.leases.remove(0)
    }

    pub async fn complete(
        &mut self,
        lease_id: &str,
        outcome: pb::complete_request::Outcome,
    ) -> Result<pb::JobState, Status> {
        let request = pb::CompleteRequest { lease_id: lease_id.into(), outcome: Some(outcome) };
        Ok(self.client.complete(request).await?.into_inner().state())
    }

    /// Sends a completion on the Lease stream (its answer comes back on the stream: [`Self::completed`]).
    pub async fn complete_on_stream(&self, lease_id: &str, outcome: pb::complete_request::Outcome) {
        let request = pb::CompleteRequest { lease_id: lease_id.into(), outcome: Some(outcome) };
        let message = pb::LeaseRequest { request: Some(lease_request::Request::Complete(request)) };
        self.requests.as_ref().expect("stream open").send(message).await.expect("the stream is open");
    }

    /// The next message, which must be the answer to a completion sent on the stream.
    pub async fn completed(&mut self, wait: Duration) -> pb::CompleteAnswer {
        match self.next_message(wait).await {
            Some(Ok(lease_response::Response::Completed(answer))) => answer,
            other => panic!("expected a completion answer within {wait:?}, got {other:?}"),
        }
    }

    pub async fn succeed(&mut self, lease_id: &str, result: &[u8]) -> Result<pb::JobState, Status> {
        self.complete(lease_id, success(result)).await
    }

    /// Half-closes the sending side; the stream stays open for receiving.
    pub fn half_close(&mut self) {
        self.requests = None;
    }
}

/// A proto duration from a (small) std one.
pub fn duration(value: Duration) -> prost_types::Duration {
    value.try_into().expect("a small duration")
}

/// A proto timestamp that must be set, as a chrono instant.
pub fn instant(value: Option<&prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let value = value.expect("a timestamp");
    chrono::DateTime::from_timestamp(value.seconds, value.nanos as u32).expect("a valid timestamp")
}

pub fn success(result: &[u8]) -> pb::complete_request::Outcome {
    pb::complete_request::Outcome::Success(pb::Success { result: result.to_vec() })
}

pub fn failure(message: &str, non_retryable: bool, retry_after: Option<Duration>) -> pb::complete_request::Outcome {
    pb::complete_request::Outcome::Failure(pb::Failure {
        message: message.into(),
        non_retryable,
        retry_after: retry_after.map(|d| d.try_into().expect("a small duration")),
    })
}

pub fn release() -> pb::complete_request::Outcome {
    pb::complete_request::Outcome::Release(pb::Release {})
}

/// Enqueues one job per spec and returns the ids.
pub async fn enqueue(client: &mut BrokerServiceClient<Channel>, jobs: Vec<pb::JobSpec>) -> Vec<String> {
    let answer = client.enqueue(pb::EnqueueRequest { jobs }).await.expect("enqueue").into_inner();
    answer.jobs.into_iter().map(|j| j.id).collect()
}

pub async fn get_job(client: &mut BrokerServiceClient<Channel>, id: &str) -> pb::Job {
    client.get_job(pb::GetJobRequest { id: id.into() }).await.expect("get job").into_inner().job.expect("a job")
}
