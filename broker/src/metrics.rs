//! Prometheus metrics: the counters and histograms the domain feeds as jobs flow, the gauges read from the
//! database at scrape time, and the small HTTP server that serves them as `GET /metrics` (text format 0.0.4).
//!
//! The domain calls [`Metrics`] with plain values (queue names, durations, outcomes) and never sees a prometheus
//! type. Labels are queue names (validated; the first `--max-metric-queues` seen by this replica, the rest
//! together as `(other)`) and small fixed sets (state, outcome, reason); never a job, lease or worker id. Counters
//! and histograms count what this replica did; the queue gauges describe the whole database, so every replica
//! reports the same values.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, http::header::CONTENT_TYPE, response::IntoResponse};
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::MetricsListen,
    model::{JobState, Settle},
    store::Store,
};

/// Pickup latency buckets, seconds: a pushed job is picked up in milliseconds, a backlog takes minutes or hours.
const PICKUP_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
/// Job duration buckets, seconds: from quick handlers to batch jobs of several hours.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 21600.0,
];

/// The `queue` label of the queues past `--max-metric-queues` (no queue name can contain parentheses).
const OTHER_QUEUES: &str = "(other)";

/// Which queues have series of their own: the first `max` this replica saw.
struct QueueLabels {
    max: usize,
    named: RwLock<HashSet<String>>,
}

impl QueueLabels {
    fn label<'q>(&self, queue: &'q str) -> &'q str {
        if self.named.read().expect("labels lock").contains(queue) {
            return queue;
        }
        let mut named = self.named.write().expect("labels lock");
        if named.len() < self.max {
            named.insert(queue.to_owned());
            queue
        } else if named.contains(queue) {
            queue
        } else {
            OTHER_QUEUES
        }
    }
}

/// How a worker's Complete ended its lease, as recorded (a cancel-requested job ends `cancelled` whatever it said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Succeeded,
    Failed,
    Retried,
    Released,
    Cancelled,
}

impl Completion {
    /// What the settle decided and where the job went.
    pub fn of(settle: &Settle, state: JobState) -> Completion {
        match (state, settle) {
            (JobState::Cancelled, _) => Completion::Cancelled,
            (_, Settle::Succeed { .. }) => Completion::Succeeded,
            (_, Settle::Fail { .. }) => Completion::Failed,
            (_, Settle::Retry { .. }) => Completion::Retried,
            (_, Settle::Release) => Completion::Released,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Completion::Succeeded => "succeeded",
            Completion::Failed => "failed",
            Completion::Retried => "retried",
            Completion::Released => "released",
            Completion::Cancelled => "cancelled",
        }
    }
}

/// Why the reaper took a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// No heartbeat before the deadline (a crashed or cut-off worker, or a closed stream's grace ran out).
    Expired,
    /// The attempt outlived the job's execution timeout.
    ExecutionTimeout,
}

impl LostReason {
    fn as_str(self) -> &'static str {
        match self {
            LostReason::Expired => "expired",
            LostReason::ExecutionTimeout => "execution_timeout",
        }
    }
}

/// One replica's metrics registry.
pub struct Metrics {
    registry: Registry,
    enqueued: IntCounterVec,
    leased: IntCounterVec,
    completed: IntCounterVec,
    leases_lost: IntCounterVec,
    pickup_latency: HistogramVec,
    job_duration: HistogramVec,
    workers_connected: IntGauge,
    queue_jobs: IntGaugeVec,
    oldest_queued_age: GaugeVec,
    pool_connections: IntGaugeVec,
    pool_max_connections: IntGauge,
    /// One scrape at a time: the gauges read from the database are cleared and refilled by each.
    scrape: tokio::sync::Mutex<()>,
    queues: QueueLabels,
}

impl Metrics {
    /// Metrics with series for at most `max_queues` queues (the rest under [`OTHER_QUEUES`]).
    pub fn new(max_queues: usize) -> Metrics {
        let registry = Registry::new();
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| HistogramOpts::new(name, help).buckets(buckets.to_vec());
        Metrics {
            enqueued: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("jobbroker_jobs_enqueued_total", "Jobs created by Enqueue (not idempotent repeats)."),
                    &["queue"],
                ),
            ),
            leased: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("jobbroker_jobs_leased_total", "Leases delivered to worker streams of this replica."),
                    &["queue"],
                ),
            ),
            completed: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "jobbroker_jobs_completed_total",
                        "Leases ended by a worker's Complete, by what the broker recorded: succeeded, failed (for \
                         good), retried, released or cancelled.",
                    ),
                    &["queue", "outcome"],
                ),
            ),
            leases_lost: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "jobbroker_leases_lost_total",
                        "Leases taken back by the reaper: expired (no heartbeat in time) or execution_timeout.",
                    ),
                    &["queue", "reason"],
                ),
            ),
            pickup_latency: register(
                &registry,
                HistogramVec::new(
                    histogram(
                        "jobbroker_pickup_latency_seconds",
                        "From when a job was due (run_at: enqueue, schedule or retry) to its lease being granted.",
                        PICKUP_BUCKETS,
                    ),
                    &["queue"],
                ),
            ),
            job_duration: register(
                &registry,
                HistogramVec::new(
                    histogram(
                        "jobbroker_job_duration_seconds",
                        "From a lease being granted to the worker's Complete, by outcome.",
                        DURATION_BUCKETS,
                    ),
                    &["queue", "outcome"],
                ),
            ),
            workers_connected: register(
                &registry,
                IntGauge::new("jobbroker_workers_connected", "Lease streams open on this replica."),
            ),
            queue_jobs: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "jobbroker_queue_jobs",
                        "Live jobs per queue and state: queued (due), scheduled (run_at in the future), leased.",
                    ),
                    &["queue", "state"],
                ),
            ),
            oldest_queued_age: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "jobbroker_queue_oldest_queued_age_seconds",
                        "How long the oldest due QUEUED job of the queue has waited since its run_at (0 when none \
                         waits).",
                    ),
                    &["queue"],
                ),
            ),
            pool_connections: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "jobbroker_db_pool_connections",
                        "Open database connections of this replica, idle or in use.",
                    ),
                    &["state"],
                ),
            ),
            pool_max_connections: register(
                &registry,
                IntGauge::new("jobbroker_db_pool_max_connections", "Most database connections this replica opens."),
            ),
            registry,
            scrape: tokio::sync::Mutex::new(()),
            queues: QueueLabels { max: max_queues, named: RwLock::default() },
        }
    }

    /// Jobs of a committed enqueue batch, one queue name per job (counted per queue, not per job).
    pub fn jobs_enqueued<'a>(&self, queues: impl IntoIterator<Item = &'a str>) {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for queue in queues {
            *counts.entry(self.queues.label(queue)).or_default() += 1;
        }
        for (queue, count) in counts {
            self.enqueued.with_label_values(&[queue]).inc_by(count);
        }
    }

    /// A lease delivered to a worker stream, `waited` after its job was due.
    pub fn job_leased(&self, queue: &str, waited: Option<Duration>) {
        let queue = self.queues.label(queue);
        self.leased.with_label_values(&[queue]).inc();
        if let Some(waited) = waited {
            self.pickup_latency.with_label_values(&[queue]).observe(waited.as_secs_f64());
        }
    }

    /// A worker completed a lease it had held for `held` (unknown for leases granted before it was recorded).
    pub fn lease_completed(&self, queue: &str, completion: Completion, held: Option<Duration>) {
        let labels = [self.queues.label(queue), completion.as_str()];
        self.completed.with_label_values(&labels).inc();
        if let Some(held) = held {
            self.job_duration.with_label_values(&labels).observe(held.as_secs_f64());
        }
    }

    pub fn lease_lost(&self, queue: &str, reason: LostReason) {
        self.leases_lost.with_label_values(&[self.queues.label(queue), reason.as_str()]).inc();
    }

    pub fn worker_connected(&self) {
        self.workers_connected.inc();
    }

    pub fn worker_disconnected(&self) {
        self.workers_connected.dec();
    }

    /// The text exposition: the gauges read from `store` now, everything else as counted. A database that does
    /// not answer leaves the queue gauges out (and is logged) rather than failing the scrape.
    pub async fn render(&self, store: &Store) -> prometheus::Result<String> {
        let _one_at_a_time = self.scrape.lock().await;
        self.queue_jobs.reset();
        self.oldest_queued_age.reset();
        match store.queue_depths().await {
            Ok(depths) => {
                for depth in &depths {
                    let queue = self.queues.label(&depth.queue);
                    for (state, count) in
                        [("queued", depth.queued), ("scheduled", depth.scheduled), ("leased", depth.leased)]
                    {
                        self.queue_jobs.with_label_values(&[queue, state]).add(count);
                    }
                    let oldest = self.oldest_queued_age.with_label_values(&[queue]);
                    oldest.set(oldest.get().max(depth.oldest_queued_age));
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read queue depths for the metrics scrape"),
        }
        let pool = store.pool_use();
        self.pool_connections.with_label_values(&["idle"]).set(pool.idle.into());
        self.pool_connections.with_label_values(&["in_use"]).set(pool.in_use.into());
        self.pool_max_connections.set(pool.max.into());
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

/// Adds a metric to `registry`; the definitions above are constants, so failing here is a bug.
fn register<C: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<C>) -> C {
    let metric = metric.expect("a valid metric definition");
    registry.register(Box::new(metric.clone())).expect("each metric is registered once");
    metric
}

/// Binds the metrics listener (before anything else starts, so a taken port fails start-up); `None` when off.
pub async fn bind(listen: &MetricsListen) -> anyhow::Result<Option<TcpListener>> {
    let listener = match listen {
        MetricsListen::Off => return Ok(None),
        MetricsListen::Address(address) => {
            TcpListener::bind(address).await.with_context(|| format!("cannot listen for metrics on {address}"))?
        }
        MetricsListen::Bound(listener) => {
            let listener = listener.try_clone().context("cannot use the metrics listener")?;
            listener.set_nonblocking(true).context("cannot use the metrics listener")?;
            TcpListener::from_std(listener).context("cannot use the metrics listener")?
        }
    };
    Ok(Some(listener))
}

/// Serves `GET /metrics` on `listener` (if any) as a task on `tracker`, until `stop` fires.
pub fn spawn(
    listener: Option<TcpListener>,
    metrics: Arc<Metrics>,
    store: Store,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let Some(listener) = listener else { return };
    let app = Router::new().route("/metrics", axum::routing::get(scrape)).with_state((metrics, store));
    tracker.spawn(async move {
        match listener.local_addr() {
            Ok(address) => tracing::info!(%address, "serving metrics on /metrics"),
            Err(error) => tracing::warn!(%error, "serving metrics on an unknown address"),
        }
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::error!(%error, "the metrics server failed");
        }
    });
}

async fn scrape(State((metrics, store)): State<(Arc<Metrics>, Store)>) -> impl IntoResponse {
    match metrics.render(&store).await {
        Ok(text) => (StatusCode::OK, [(CONTENT_TYPE, prometheus::TEXT_FORMAT)], text),
        Err(error) => {
            tracing::error!(%error, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, [(CONTENT_TYPE, "text/plain")], "cannot encode metrics\n".into())
        }
    }
}
