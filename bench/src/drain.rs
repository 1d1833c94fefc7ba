//! Drain throughput through the Rust worker API (`jobbroker::worker`): worker loops with a no-op handler take a
//! backlog over gRPC, from the first job handed to a handler to the last completion the database recorded.
//!
//! The end is read from `finished_jobs.finished_at` (the database clock) and the start from this process's wall
//! clock; both are the same machine's clock, since the bench only measures a local broker and Postgres.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use jobbroker::worker::{self, Control, Outcome, WorkerOptions};
use sqlx::PgPool;
use tokio::{sync::Notify, task::JoinSet};

use crate::{
    enqueue,
    env::Env,
    report::{Bar, Figure},
    usage::Window,
};

/// Longest a drain (or any wait for completions) may take.
pub const PATIENCE: Duration = Duration::from_secs(900);

/// How the draining workers are set up.
#[derive(Debug, Clone, Copy)]
pub struct Workers {
    /// Worker loops, each with its own connection and Lease stream.
    pub count: usize,
    pub capacity: u32,
}

/// Seconds since the Unix epoch, by this machine's clock.
pub fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The drain scenario: a backlog of `jobs`, drained with the broker's and Postgres's CPU and the broker's peak
/// memory measured over the drain.
pub async fn run(env: &Env, jobs: usize, workers: Workers) -> anyhow::Result<Vec<Figure>> {
    enqueue::batches(env, "drain", jobs, 1000).await?;
    let window = Window::start(env.broker()?, env.postmaster)?;
    let took = drain(env, "drain", jobs, workers).await?;
    let used = window.finish().await?;
    let name = format!("drain: {jobs} no-op jobs, {} workers × capacity {}", workers.count, workers.capacity);
    let mut figures = vec![
        Figure::rate("drain.rate", name, jobs, took).bar(Bar::AtLeast(30_000.0)),
        Figure::new("drain.broker_rss_peak", "drain: broker peak RSS", used.broker_peak_mib, "MiB")
            .bar(Bar::AtMost(100.0)),
    ];
    figures.extend(used.per_10k("drain", "drain", "worker loops", jobs));
    Ok(figures)
}

/// Runs worker loops on `queue` until `target` jobs of it have finished, then drains them; the time from the
/// first job a handler saw to the `target`-th completion. Jobs beyond `target` may remain queued.
pub async fn drain(env: &Env, queue: &str, target: usize, workers: Workers) -> anyhow::Result<Duration> {
    quiesce(&env.pool).await?;
    let consumers = consume(env, queue, workers, target);
    // Counting completions in the database only from then on keeps the polling off the measured work.
    let finished = match tokio::time::timeout(PATIENCE, consumers.handed.reached.notified()).await {
        Ok(()) => wait_finished(&env.pool, queue, target, PATIENCE).await,
        Err(_) => Err(anyhow::anyhow!("{queue}: {target} jobs were not handed out within {PATIENCE:?}")),
    };
    let first = consumers.handed.first.get().copied();
    consumers.stop().await?;
    finished?;
    let last = nth_finished_at(&env.pool, queue, target).await?;
    let first = first.context("no job was handed to a worker")?;
    Ok(Duration::from_secs_f64((last - first).max(1e-6)))
}

/// Before every timed drain (the empty-table one too): vacuum and analyze `jobs` and write a checkpoint, so the
/// timing does not include the one-off maintenance that loading the jobs just triggered (autovacuum of a table
/// that grew by a million rows, a checkpoint forced by the WAL the load wrote). A role that may not checkpoint
/// gets a note and the drain runs anyway.
async fn quiesce(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("VACUUM (ANALYZE) jobs").execute(pool).await.context("vacuuming jobs before the drain")?;
    if let Err(error) = sqlx::query("CHECKPOINT").execute(pool).await {
        eprintln!("bench: no checkpoint before the drain: {error}");
    }
    Ok(())
}

/// Worker loops with a no-op handler, running until [`Consumers::stop`].
pub struct Consumers {
    loops: JoinSet<Result<(), tonic::Status>>,
    handed: Arc<Handed>,
    control: Control,
}

/// What the handlers saw.
struct Handed {
    /// When the first job reached a handler (epoch seconds).
    first: OnceLock<f64>,
    count: AtomicUsize,
    /// Notified when `count` reaches `target`.
    target: usize,
    reached: Notify,
}

/// Starts `workers.count` worker loops on `queue`, each with its own connection and Lease stream.
pub fn consume(env: &Env, queue: &str, workers: Workers, target: usize) -> Consumers {
    let handed =
        Arc::new(Handed { first: OnceLock::new(), count: AtomicUsize::new(0), target, reached: Notify::new() });
    let control = Control::default();
    let mut loops = JoinSet::new();
    for w in 0..workers.count {
        let mut options = WorkerOptions::new([env.address.as_str()], [queue], workers.capacity);
        options.worker_id = format!("bench-{queue}-{w}");
        let handed = handed.clone();
        let handler = move |_job: worker::ActiveJob| {
            handed.first.get_or_init(epoch_now);
            if handed.count.fetch_add(1, Ordering::Relaxed) + 1 == handed.target {
                handed.reached.notify_one();
            }
            std::future::ready(Outcome::Success(Vec::new()))
        };
        loops.spawn(worker::run(options, handler, control.clone()));
    }
    Consumers { loops, handed, control }
}

impl Consumers {
    /// Drains the loops (running jobs finish and are completed) and waits for them to end.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.control.drain.cancel();
        while let Some(ended) = self.loops.join_next().await {
            ended??;
        }
        Ok(())
    }
}

/// Waits until at least `count` jobs of `queue` have finished, for at most `patience`.
pub async fn wait_finished(pool: &PgPool, queue: &str, count: usize, patience: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        let finished: i64 = sqlx::query_scalar("SELECT count(*) FROM finished_jobs WHERE queue = $1")
            .bind(queue)
            .fetch_one(pool)
            .await?;
        if finished as usize >= count {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{queue}: {finished} of {count} jobs finished in {patience:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When the `n`-th job of `queue` finished (epoch seconds, database clock).
async fn nth_finished_at(pool: &PgPool, queue: &str, n: usize) -> anyhow::Result<f64> {
    let at: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at)::float8 FROM finished_jobs WHERE queue = $1 \
         ORDER BY finished_at OFFSET $2 LIMIT 1",
    )
    .bind(queue)
    .bind(n as i64 - 1)
    .fetch_one(pool)
    .await?;
    Ok(at)
}
