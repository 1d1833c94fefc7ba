//! Group commit: concurrent requests are coalesced into one batch, handled by one call, answered one by one.
//!
//! A few writer tasks share one queue; each takes whatever has arrived (up to a weight limit) and hands it to the
//! handler as one batch, so N concurrent RPCs cost one transaction instead of N. This module knows nothing about
//! jobs: the handlers in `enqueue` and `complete` do.

use std::{future::Future, sync::Arc};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::error::{Error, Result};

/// Handles a whole batch; answers one result per request, in order.
pub trait BatchHandler: Send + Sync + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// How much of the batch limit one request uses (jobs in an Enqueue, 1 for a Complete).
    fn weight(request: &Self::Request) -> usize;

    fn handle(&self, batch: Vec<Self::Request>) -> impl Future<Output = Vec<Result<Self::Response>>> + Send;
}

type Pending<H> = (<H as BatchHandler>::Request, oneshot::Sender<Result<<H as BatchHandler>::Response>>);

/// The submitting side of a group-commit queue.
pub struct Batcher<H: BatchHandler> {
    submit: mpsc::Sender<Pending<H>>,
}

impl<H: BatchHandler> Batcher<H> {
    /// Starts `writers` tasks named `name` that run batches of at most `max_weight` through `handler`.
    pub fn start(
        name: &'static str,
        handler: Arc<H>,
        writers: usize,
        max_weight: usize,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Batcher<H> {
        let (submit, receive) = mpsc::channel::<Pending<H>>(max_weight.max(1024));
        let receive = Arc::new(Mutex::new(receive));
        for _ in 0..writers {
            let (handler, receive, shutdown) = (handler.clone(), receive.clone(), shutdown.clone());
            tracker.spawn(async move {
                tracing::debug!(task = name, "batch writer started");
                while let Some(batch) = next_batch::<H>(&receive, max_weight, &shutdown).await {
                    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let answers = handler.handle(requests).await;
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
            });
        }
        Batcher { submit }
    }

    /// Queues one request and waits for its answer.
    pub async fn call(&self, request: H::Request) -> Result<H::Response> {
        let (reply, answer) = oneshot::channel();
        self.submit.send((request, reply)).await.map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the broker is shutting down; retry on another replica".into())
}

/// Waits for a first request, then takes whatever else is already queued, up to `max_weight`.
async fn next_batch<H: BatchHandler>(
    receive: &Mutex<mpsc::Receiver<Pending<H>>>,
    max_weight: usize,
    shutdown: &CancellationToken,
) -> Option<Vec<Pending<H>>> {
    let mut receive = receive.lock().await;
    let first = tokio::select! {
        first = receive.recv() => first?,
        () = shutdown.cancelled() => return None,
    };
    let mut weight = H::weight(&first.0);
    let mut batch = vec![first];
    while weight < max_weight {
        match receive.try_recv() {
            Ok(next) => {
                weight += H::weight(&next.0);
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}
