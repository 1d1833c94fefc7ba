//! Group commit: concurrent requests are coalesced into one batch, handled by one call, answered one by one.
//!
//! A few writer tasks share one queue; each takes whatever has arrived (up to a weight limit) and hands it to the
//! handler as one batch, so N concurrent RPCs cost one transaction instead of N. A writer starts a batch while
//! another is still committing only when the batch is worth a statement of its own ([`PARALLEL_WEIGHT`]):
//! otherwise it keeps collecting until the other finishes, because two slivers cost the database two statements
//! where one batch costs one. Big batches (Enqueues of many jobs, completions of a busy drain) still run in
//! parallel. This module knows nothing about jobs: the handlers in `enqueue` and `complete` do.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::error::{Error, Result};

/// The weight (jobs) from which a batch is started although another writer is still committing. Measured here
/// (BENCHMARKS.md, item 11): single-job Enqueues from 64 clients ran ≈ 20 % faster through one writer's batches
/// than split between two, and the steady state's p99 fell; Enqueues of 1000 jobs ran faster through two
/// statements in parallel (Postgres runs each on one core).
const PARALLEL_WEIGHT: usize = 100;

/// Handles a whole batch; answers one result per request, in order.
pub trait BatchHandler: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Response: Send + 'static;

    /// How much of the batch limit one request uses (jobs in an Enqueue, 1 for a Complete).
    fn weight(request: &Self::Request) -> usize;

    /// Must change nothing when it fails the whole batch: the writer may then try its requests one by one.
    fn handle(&self, batch: &[Self::Request]) -> impl Future<Output = Vec<Result<Self::Response>>> + Send;
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
        let queue =
            Arc::new(Queue::<H> { receive: Mutex::new(receive), busy: AtomicUsize::new(0), done: Notify::new() });
        for _ in 0..writers {
            let (handler, queue, shutdown) = (handler.clone(), queue.clone(), shutdown.clone());
            tracker.spawn(async move {
                tracing::debug!(task = name, "batch writer started");
                while let Some((batch, busy)) = queue.next_batch(max_weight, &shutdown).await {
                    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let answers = handle_isolated(&*handler, &requests).await;
                    drop(busy);
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

/// Handles a batch; when the store refused it whole for a reason no retry cures (`Internal`: one request the
/// database rejects fails the statement all share), each request is tried alone, so only the bad one fails.
async fn handle_isolated<H: BatchHandler>(handler: &H, requests: &[H::Request]) -> Vec<Result<H::Response>> {
    let answers = handler.handle(requests).await;
    if requests.len() < 2 || !answers.iter().all(|answer| matches!(answer, Err(Error::Internal(_)))) {
        return answers;
    }
    tracing::warn!(requests = requests.len(), "a batch failed as a whole; trying its requests one by one");
    let mut alone = Vec::with_capacity(requests.len());
    for request in requests {
        alone.extend(handler.handle(std::slice::from_ref(request)).await);
    }
    alone
}

fn shutting_down() -> Error {
    Error::Unavailable("the broker is shutting down; retry on another replica".into())
}

/// What the writers of one batcher share.
struct Queue<H: BatchHandler> {
    receive: Mutex<mpsc::Receiver<Pending<H>>>,
    /// Writers whose batch is being handled.
    busy: AtomicUsize,
    /// Signalled when a writer's batch has been handled.
    done: Notify,
}

impl<H: BatchHandler> Queue<H> {
    /// Waits for a first request, then takes whatever else is already queued, up to `max_weight`. While another
    /// writer is busy, a batch lighter than [`PARALLEL_WEIGHT`] keeps collecting until that writer is done.
    async fn next_batch(
        &self,
        max_weight: usize,
        shutdown: &CancellationToken,
    ) -> Option<(Vec<Pending<H>>, Busy<'_, H>)> {
        let mut receive = self.receive.lock().await;
        let first = tokio::select! {
            first = receive.recv() => first?,
            () = shutdown.cancelled() => return None,
        };
        let mut weight = H::weight(&first.0);
        let mut batch = vec![first];
        loop {
            while weight < max_weight {
                match receive.try_recv() {
                    Ok(next) => {
                        weight += H::weight(&next.0);
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            if weight >= max_weight.min(PARALLEL_WEIGHT) || self.busy.load(Ordering::SeqCst) == 0 {
                break;
            }
            // A `done` that came between the check and here left a permit: this wakes at once and checks again.
            tokio::select! {
                () = self.done.notified() => {}
                next = receive.recv() => match next {
                    Some(next) => {
                        weight += H::weight(&next.0);
                        batch.push(next);
                    }
                    None => break,
                },
                () = shutdown.cancelled() => break,
            }
        }
        self.busy.fetch_add(1, Ordering::SeqCst);
        Some((batch, Busy(self)))
    }
}

/// Counts a writer as busy until dropped (also when its handler panics, so no writer waits for it forever).
struct Busy<'q, H: BatchHandler>(&'q Queue<H>);

impl<H: BatchHandler> Drop for Busy<'_, H> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.done.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex as StdMutex, time::Duration};

    use tokio::task::JoinHandle;

    use super::*;

    /// Records the weights of each batch; a batch holding a request marked `hold` waits for `release`.
    #[derive(Default)]
    struct Recorder {
        batches: StdMutex<Vec<Vec<usize>>>,
        release: Notify,
    }

    impl BatchHandler for Recorder {
        /// (weight, hold)
        type Request = (usize, bool);
        type Response = ();

        fn weight(request: &(usize, bool)) -> usize {
            request.0
        }

        async fn handle(&self, batch: &[(usize, bool)]) -> Vec<Result<()>> {
            self.batches.lock().expect("not poisoned").push(batch.iter().map(|r| r.0).collect());
            if batch.iter().any(|r| r.1) {
                self.release.notified().await;
            }
            batch.iter().map(|_| Ok(())).collect()
        }
    }

    /// A batcher of two writers, one of them busy with a held batch of weight 1 (the handle answers when released).
    async fn one_writer_busy() -> (Arc<Recorder>, Arc<Batcher<Recorder>>, JoinHandle<Result<()>>) {
        let recorder = Arc::new(Recorder::default());
        let batcher =
            Arc::new(Batcher::start("test", recorder.clone(), 2, 5000, &TaskTracker::new(), CancellationToken::new()));
        let held = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call((1, true)).await }
        });
        settle().await;
        (recorder, batcher, held)
    }

    /// The answer of a call, failing the test (rather than hanging it) if none comes.
    async fn answered<T>(call: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), call).await.expect("answered within 5 s")
    }

    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn small_requests_wait_for_the_busy_writer_and_go_as_one_batch() {
        let (recorder, batcher, held) = one_writer_busy().await;
        let small: Vec<_> = (0..10)
            .map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.call((1, false)).await })
            })
            .collect();
        settle().await;
        assert_eq!(recorder.batches.lock().expect("not poisoned").len(), 1, "the idle writer waited");
        recorder.release.notify_one();
        answered(held).await.expect("joined").expect("answered");
        for call in small {
            answered(call).await.expect("joined").expect("answered");
        }
        assert_eq!(*recorder.batches.lock().expect("not poisoned"), vec![vec![1], vec![1; 10]]);
    }

    #[tokio::test]
    async fn a_heavy_batch_runs_beside_the_busy_writer() {
        let (recorder, batcher, held) = one_writer_busy().await;
        answered(batcher.call((PARALLEL_WEIGHT, false))).await.expect("answered while the other writer is busy");
        recorder.release.notify_one();
        answered(held).await.expect("joined").expect("answered");
        assert_eq!(*recorder.batches.lock().expect("not poisoned"), vec![vec![1], vec![PARALLEL_WEIGHT]]);
    }

    /// Panics on a batch holding `true`.
    struct Panicker;

    impl BatchHandler for Panicker {
        type Request = bool;
        type Response = ();

        fn weight(_: &bool) -> usize {
            1
        }

        async fn handle(&self, batch: &[bool]) -> Vec<Result<()>> {
            assert!(!batch.contains(&true), "the handler failed");
            batch.iter().map(|_| Ok(())).collect()
        }
    }

    #[tokio::test]
    async fn a_writer_whose_handler_panicked_is_no_longer_waited_for() {
        let batcher =
            Batcher::start("test", Arc::new(Panicker), 2, 5000, &TaskTracker::new(), CancellationToken::new());
        assert!(batcher.call(true).await.is_err(), "the panicked batch's caller is answered with an error");
        answered(batcher.call(false)).await.expect("the other writer took the next request");
    }

    /// Holds a batch holding `Hold` until released; fails a whole batch holding `Poison`, like a statement that
    /// one row's bad value fails for all.
    #[derive(Default)]
    struct Poisonable {
        sizes: StdMutex<Vec<usize>>,
        release: Notify,
    }

    #[derive(PartialEq)]
    enum Call {
        Hold,
        Good,
        Poison,
    }

    impl BatchHandler for Poisonable {
        type Request = Call;
        type Response = ();

        fn weight(_: &Call) -> usize {
            1
        }

        async fn handle(&self, batch: &[Call]) -> Vec<Result<()>> {
            self.sizes.lock().expect("not poisoned").push(batch.len());
            if batch.contains(&Call::Hold) {
                self.release.notified().await;
            }
            let answer = if batch.contains(&Call::Poison) { Err(Error::Internal("bad row".into())) } else { Ok(()) };
            batch.iter().map(|_| answer.clone()).collect()
        }
    }

    #[tokio::test]
    async fn one_request_the_store_refuses_does_not_fail_the_rest_of_its_batch() {
        let handler = Arc::new(Poisonable::default());
        let batcher =
            Arc::new(Batcher::start("test", handler.clone(), 1, 5000, &TaskTracker::new(), CancellationToken::new()));
        let call = |kind| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.call(kind).await })
        };
        let held = call(Call::Hold);
        settle().await;
        let calls: Vec<_> = [Call::Good, Call::Good, Call::Poison, Call::Good].into_iter().map(call).collect();
        settle().await;
        handler.release.notify_one();
        answered(held).await.expect("joined").expect("answered");
        let mut answers = Vec::new();
        for call in calls {
            answers.push(answered(call).await.expect("joined").is_ok());
        }
        assert_eq!(answers, [true, true, false, true], "only the poisoned request failed");
        assert_eq!(*handler.sizes.lock().expect("not poisoned"), [1, 4, 1, 1, 1, 1], "one batch, then one by one");
    }
}
