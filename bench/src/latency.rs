//! Pickup latency on an idle queue: enqueue one job, time until a waiting worker's Lease stream delivers it,
//! complete it, repeat. Raw Lease streams (not the worker loop) so the time ends at the assignment itself.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use jobbroker::v1::{self as pb, lease_request, lease_response};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};

use crate::{
    enqueue::spec,
    env::{Client, Env},
    report::{self, Bar, Figure},
};

/// An open Lease stream.
pub struct Stream {
    /// Our side of the stream: it stays open while this lives.
    _requests: mpsc::Sender<pb::LeaseRequest>,
    responses: tonic::Streaming<pb::LeaseResponse>,
}

/// Registers `worker` on `queue` with `capacity`.
pub async fn open(client: &mut Client, worker: &str, queue: &str, capacity: u32) -> anyhow::Result<Stream> {
    let (requests, outbound) = mpsc::channel(4);
    let register =
        pb::Register { worker_id: worker.into(), queues: vec![queue.into()], capacity, ..Default::default() };
    requests.send(pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) }).await?;
    let responses = client.lease(ReceiverStream::new(outbound)).await?.into_inner();
    Ok(Stream { _requests: requests, responses })
}

impl Stream {
    /// The next assignment's lease id (other messages are skipped).
    pub async fn assignment(&mut self) -> anyhow::Result<String> {
        loop {
            let message = self.responses.next().await.context("the lease stream ended")??;
            if let Some(lease_response::Response::Assignment(assignment)) = message.response {
                return Ok(assignment.lease_id);
            }
        }
    }

    /// Sends every assignment's lease id to `to` until the stream or the receiver ends.
    pub async fn forward(mut self, to: mpsc::Sender<String>) {
        while let Ok(lease_id) = self.assignment().await {
            if to.send(lease_id).await.is_err() {
                return;
            }
        }
    }
}

pub fn success(lease_id: String) -> pb::CompleteRequest {
    pb::CompleteRequest {
        lease_id,
        outcome: Some(pb::complete_request::Outcome::Success(pb::Success { result: Vec::new() })),
    }
}

/// The pickup scenario: one waiting worker with capacity 1, `samples` jobs one after another.
pub async fn run(env: &Env, samples: usize) -> anyhow::Result<Vec<Figure>> {
    let mut client = env.client().await?;
    let stream = open(&mut client, "latency", "latency", 1).await?;
    let (to, mut assignments) = mpsc::channel(1);
    let forwarding = tokio::spawn(stream.forward(to));
    let mut took = pickups(&mut client, "latency", samples, &mut assignments).await?;
    forwarding.abort();
    let bars = [Some(Bar::AtMost(1.5)), Some(Bar::AtMost(5.0))];
    Ok(report::percentiles("pickup", &format!("pickup latency, idle queue, {samples} jobs:"), &mut took, bars))
}

/// Enqueues `samples` jobs on `queue` one at a time; for each, the time until some waiting worker's stream
/// delivered it (reported on `assignments`). Completes each before the next.
pub async fn pickups(
    client: &mut Client,
    queue: &str,
    samples: usize,
    assignments: &mut mpsc::Receiver<String>,
) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        client.enqueue(pb::EnqueueRequest { jobs: vec![spec(queue, i.to_le_bytes())] }).await?;
        let lease_id = tokio::time::timeout(Duration::from_secs(30), assignments.recv())
            .await
            .context("no worker got the job within 30 s")?
            .context("the workers' streams ended")?;
        took.push(started.elapsed());
        client.complete(success(lease_id)).await?;
    }
    Ok(took)
}
