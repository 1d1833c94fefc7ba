//! Domain logic: what the broker does with jobs, leases and worker streams, in plain Rust types.
//!
//! [`Broker`] is the one entry point the gRPC adapters call. It owns the group-commit batchers, the dispatcher
//! and the background tasks. It never sees a proto type and never writes SQL (that is `store`).

mod admin;
mod background;
mod batch;
pub mod dispatch;
mod enqueue;
mod lease;
mod retry;
mod watch;

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, mpsc, watch as signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

pub use self::lease::BeatResult;
use self::{
    admin::QueueBounds,
    batch::Batcher,
    dispatch::{DispatchSettings, Dispatcher, Registration, Session, SessionEvent},
    enqueue::EnqueueHandler,
    lease::{CompleteHandler, HeartbeatHandler, Leases},
    watch::Watchers,
};
use crate::{
    config::Settings,
    error::{Error, Result},
    metrics::Metrics,
    model::{Beat, Enqueued, Job, JobState, Outcome, SpecRequest},
    store::Store,
};

/// How often the database health probe runs.
const HEALTH_PERIOD: Duration = Duration::from_secs(1);
/// How often a cancel is retried while the job moves between states under it.
const CANCEL_ATTEMPTS: usize = 5;

/// One replica's broker: everything behind the gRPC services.
pub struct Broker {
    store: Store,
    enqueue: Batcher<EnqueueHandler>,
    complete: Batcher<CompleteHandler>,
    heartbeat: Batcher<HeartbeatHandler>,
    dispatcher: Arc<Dispatcher>,
    watchers: Arc<Watchers>,
    metrics: Arc<Metrics>,
    /// Max depths of bounded queues, for the enqueue path.
    bounds: Arc<QueueBounds>,
    healthy: signal::Receiver<bool>,
    tracker: TaskTracker,
    /// Fired by [`Broker::close_streams`]: long-lived streams (watches) end so shutdown can drain.
    closing: CancellationToken,
}

impl Broker {
    /// Starts the batchers, dispatcher and background tasks on `tracker`; they stop when `shutdown` fires.
    pub fn start(store: Store, settings: Settings, tracker: TaskTracker, shutdown: CancellationToken) -> Arc<Broker> {
        let watchers = Arc::new(Watchers::default());
        let metrics = Arc::new(Metrics::new(settings.max_metric_queues));
        let bounds = Arc::new(QueueBounds::default());
        // Hostname plus a per-start id, as workers name themselves: a restarted pod keeps its hostname.
        let replica = jobbroker::worker::default_worker_id();
        let reaper_wake = Arc::new(Notify::new());
        let dispatcher = Arc::new(Dispatcher::new(
            store.clone(),
            DispatchSettings {
                poll_interval: settings.poll_interval,
                reconnect_grace: settings.reconnect_grace,
                max_claim: settings.write_batch,
                replica: replica.clone(),
            },
            watchers.clone(),
            metrics.clone(),
            reaper_wake.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
        let leases = Arc::new(Leases {
            store: store.clone(),
            dispatcher: dispatcher.clone(),
            watchers: watchers.clone(),
            metrics: metrics.clone(),
        });
        let enqueue_handler = EnqueueHandler {
            store: store.clone(),
            defaults: settings.defaults.clone(),
            dispatcher: dispatcher.clone(),
            metrics: metrics.clone(),
            bounds: bounds.clone(),
        };
        let (writers, batch) = (settings.writers, settings.write_batch);
        let enqueue = Batcher::start("enqueue", Arc::new(enqueue_handler), writers, batch, &tracker, shutdown.clone());
        let complete = Batcher::start(
            "complete",
            Arc::new(CompleteHandler(leases.clone())),
            writers,
            batch,
            &tracker,
            shutdown.clone(),
        );
        let heartbeat = Batcher::start(
            "heartbeat",
            Arc::new(HeartbeatHandler(leases.clone())),
            writers,
            batch,
            &tracker,
            shutdown.clone(),
        );
        let (healthy_tx, healthy) = signal::channel(false);
        tracker.spawn(background::reaper(leases, settings.reaper_interval, reaper_wake, shutdown.clone()));
        tracker.spawn(background::retention(store.clone(), settings.clone(), shutdown.clone()));
        tracker.spawn(background::listener(store.clone(), dispatcher.clone(), shutdown.clone()));
        tracker.spawn(background::reconcile(
            store.clone(),
            dispatcher.clone(),
            settings.poll_interval,
            shutdown.clone(),
        ));
        let watch_poll = settings.watch_poll_interval;
        tracker.spawn(background::watches(store.clone(), watchers.clone(), watch_poll, shutdown.clone()));
        tracker.spawn(background::health(store.clone(), HEALTH_PERIOD, healthy_tx, shutdown.clone()));
        tracker.spawn(background::sessions(store.clone(), replica, shutdown.clone()));
        tracker.spawn(background::bounds(store.clone(), bounds.clone(), settings.poll_interval, shutdown.clone()));
        Arc::new(Broker {
            store,
            enqueue,
            complete,
            heartbeat,
            dispatcher,
            watchers,
            metrics,
            bounds,
            healthy,
            tracker,
            closing: shutdown.child_token(),
        })
    }

    /// What this replica counts, for the metrics endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Whether the job store answers; changes as the health probe sees it.
    pub fn store_health(&self) -> signal::Receiver<bool> {
        self.healthy.clone()
    }

    /// Stores a batch atomically (group commit with concurrent calls); answers after the commit.
    pub async fn enqueue(&self, specs: Vec<SpecRequest>) -> Result<Vec<Enqueued>> {
        self.enqueue.call(specs).await
    }

    /// Opens a worker stream session.
    pub async fn open_session(
        &self,
        registration: Registration,
    ) -> Result<(Arc<Session>, mpsc::UnboundedReceiver<SessionEvent>)> {
        self.dispatcher.open(registration).await
    }

    pub async fn set_capacity(&self, session: &Session, capacity: u32) {
        self.dispatcher.set_capacity(session, capacity).await;
    }

    /// The stream ended; `abrupt` when the worker went away rather than the broker closing it.
    pub async fn close_session(&self, session: &Arc<Session>, abrupt: bool) {
        self.dispatcher.close(session, abrupt).await;
    }

    /// Extends leases and records progress; `None` for each lease that is not current.
    pub async fn heartbeat(&self, beats: Vec<Beat>) -> Result<Vec<BeatResult>> {
        self.heartbeat.call(beats).await
    }

    /// Ends an attempt, fenced by the lease.
    pub async fn complete(&self, lease_id: Uuid, outcome: Outcome) -> Result<JobState> {
        self.complete.call((lease_id, outcome)).await
    }

    pub async fn job(&self, id: Uuid) -> Result<Job> {
        self.store.job(id).await?.ok_or_else(|| Error::NotFound(format!("job {id}")))
    }

    /// QUEUED → CANCELLED at once; LEASED → cancel requested and the holder told (via NOTIFY, on any replica).
    pub async fn cancel(&self, id: Uuid) -> Result<Job> {
        for _ in 0..CANCEL_ATTEMPTS {
            if self.store.cancel_queued(id).await? || self.store.request_cancel(id).await?.is_some() {
                self.watchers.changed(id);
                return self.job(id).await;
            }
            let job = self.job(id).await?;
            if job.state.is_terminal() {
                return Err(Error::FailedPrecondition(format!(
                    "job {id} is already {}; only QUEUED or LEASED jobs can be cancelled",
                    job.state.as_str().to_uppercase()
                )));
            }
        }
        Err(Error::Unavailable(format!("job {id} kept changing state; retry the cancel")))
    }

    /// Streams the job now and after every change observed, ending after a terminal state.
    pub async fn watch(self: &Arc<Self>, id: Uuid) -> Result<mpsc::Receiver<Result<Job>>> {
        let first = self.job(id).await?;
        let (send, receive) = mpsc::channel(16);
        let broker = self.clone();
        self.tracker.spawn(async move { broker.follow(first, send).await });
        Ok(receive)
    }

    async fn follow(&self, first: Job, send: mpsc::Sender<Result<Job>>) {
        let watch = self.watchers.watch(first.id);
        let mut last = first;
        if send.send(Ok(last.clone())).await.is_err() {
            return;
        }
        while !last.state.is_terminal() {
            tokio::select! {
                () = watch.notify.notified() => {}
                () = send.closed() => return,
                () = self.closing.cancelled() => {
                    let _ = send.send(Err(Error::Unavailable("the broker is shutting down; watch again".into()))).await;
                    return;
                }
            }
            let job = match self.store.job(last.id).await {
                Ok(Some(job)) => job,
                Ok(None) => {
                    let _ = send.send(Err(Error::NotFound(format!("job {} (deleted)", last.id)))).await;
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, "watch re-read failed; trying again");
                    continue;
                }
            };
            if observable(&job) != observable(&last) {
                if send.send(Ok(job.clone())).await.is_err() {
                    return;
                }
                last = job;
            }
        }
    }

    /// Shutdown, first step: stop handing out leases and tell every worker stream to reconnect elsewhere.
    pub fn close_streams(&self) {
        self.closing.cancel();
        self.dispatcher.close_all();
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// What a watcher is told about: a heartbeat that only moves the deadline is not a change. `Store::watch_marks`
/// hashes the same fields for the watch poll: change both.
fn observable(job: &Job) -> impl PartialEq + '_ {
    (job.state, job.attempt, &job.progress, job.cancel_requested, &job.last_error, &job.worker_id, job.run_at)
}
