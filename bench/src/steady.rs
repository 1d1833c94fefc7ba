//! Steady state: a producer sends single-job Enqueue RPCs at a fixed rate (open loop: a slow answer does not
//! slow the producer) while worker loops drain the queue. Measured: end-to-end latency from the moment the
//! producer sent a job to the completion the database recorded (the send time travels in the payload; both
//! clocks are this machine's), and the queue depth sampled every 100 ms, to see whether it stays flat. The
//! producer first runs a warm-up at the same rate: the latency of the jobs sent then is reported on its own line,
//! not mixed into the steady state's.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use jobbroker::v1 as pb;
use tokio::{
    sync::Semaphore,
    task::JoinSet,
    time::{MissedTickBehavior, interval},
};

use crate::{
    drain::{self, Workers, epoch_now},
    enqueue::spec,
    env::Env,
    report::{Bar, Figure},
};

/// Connections the producer spreads its RPCs over.
const PRODUCER_CONNECTIONS: usize = 8;
/// Most Enqueue RPCs in flight; beyond it the producer falls behind (the achieved rate shows it). With the
/// workers' Complete RPCs this stays under the broker's default `--max-concurrent-requests` (2048).
const MAX_IN_FLIGHT: usize = 512;
const QUEUE: &str = "steady";
/// How long the last jobs may take to finish once the producer stopped.
const SETTLE: Duration = Duration::from_secs(30);

pub async fn run(
    env: &Env,
    rate: u32,
    warmup: Duration,
    duration: Duration,
    workers: Workers,
) -> anyhow::Result<Vec<Figure>> {
    let consumers = drain::consume(env, QUEUE, workers, usize::MAX);
    // Jobs sent from this instant on (epoch seconds, as in the payload) are the steady state.
    let measured_from = epoch_now() + warmup.as_secs_f64();
    let producing = produce(env, rate, warmup + duration);
    let depth = sample_depth(env, warmup + duration);
    let (sent, depths) = tokio::try_join!(producing, depth)?;
    // A broker that keeps up finishes the last jobs within milliseconds; one that stalls is reported, not waited
    // for.
    let settled = drain::wait_finished(&env.pool, QUEUE, sent, SETTLE).await;
    let stuck: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1").bind(QUEUE).fetch_one(&env.pool).await?;
    if settled.is_err() {
        eprintln!("bench: steady: {stuck} of {sent} jobs still unfinished {SETTLE:?} after the producer stopped");
    }
    consumers.stop().await?;

    let (p50, p99, max) = e2e(env, measured_from, f64::INFINITY).await?;
    let (_, warmup_p99, _) = e2e(env, 0.0, measured_from).await?;
    let what = format!(
        "steady {rate} jobs/s for {}, e2e (enqueue → completion recorded)",
        humantime::format_duration(duration)
    );
    let achieved = sent as f64 / (warmup + duration).as_secs_f64();
    let last_second = &depths[depths.len().saturating_sub(10)..];
    Ok(vec![
        Figure::new("steady.rate", format!("steady: achieved enqueue rate (asked {rate})"), achieved, "jobs/s"),
        Figure::new("steady.e2e.p50", format!("{what} p50"), p50, "ms"),
        Figure::new("steady.e2e.p99", format!("{what} p99"), p99, "ms").bar(Bar::AtMost(20.0)),
        Figure::new("steady.e2e.max", format!("{what} max"), max, "ms"),
        Figure::new(
            "steady.warmup.p99",
            format!("steady: e2e p99 of the {} warm-up before it", humantime::format_duration(warmup)),
            warmup_p99,
            "ms",
        ),
        Figure::new("steady.depth.max", "steady: queue depth, max of 100 ms samples", max_of(&depths), "jobs"),
        Figure::new("steady.depth.end", "steady: queue depth, max over the last second", max_of(last_second), "jobs"),
        Figure::new(
            "steady.unfinished",
            format!("steady: jobs unfinished {SETTLE:?} after the producer stopped"),
            stuck as f64,
            "jobs",
        )
        .bar(Bar::AtMost(0.0)),
    ])
}

/// End-to-end latency p50, p99 and max (ms) of the finished jobs sent in `[from, to)` (epoch seconds).
async fn e2e(env: &Env, from: f64, to: f64) -> anyhow::Result<(f64, f64, f64)> {
    let (p50, p99, max): (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "WITH sent AS (SELECT convert_from(payload, 'UTF8')::float8 AS sent, finished_at FROM finished_jobs \
           WHERE queue = $1), \
         e2e AS (SELECT extract(epoch FROM finished_at)::float8 * 1000 - sent * 1000 AS ms FROM sent \
           WHERE sent >= $2 AND sent < $3) \
         SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY ms), percentile_disc(0.99) WITHIN GROUP (ORDER BY ms), \
           max(ms) FROM e2e",
    )
    .bind(QUEUE)
    .bind(from)
    .bind(to)
    .fetch_one(&env.pool)
    .await?;
    Ok((p50.unwrap_or(f64::NAN), p99.unwrap_or(f64::NAN), max.unwrap_or(f64::NAN)))
}

fn max_of(values: &[i64]) -> f64 {
    values.iter().copied().max().unwrap_or(0) as f64
}

/// Sends single-job Enqueue RPCs at `rate` per second for `duration`; how many it sent (all acknowledged).
async fn produce(env: &Env, rate: u32, duration: Duration) -> anyhow::Result<usize> {
    let mut clients = Vec::new();
    for _ in 0..PRODUCER_CONNECTIONS {
        clients.push(env.client().await?);
    }
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut rpcs = JoinSet::new();
    let mut tick = interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64().min(duration.as_secs_f64()) * f64::from(rate)) as usize;
        while sent < due {
            let slot = slots.clone().acquire_owned().await?;
            let mut client = clients[sent % PRODUCER_CONNECTIONS].clone();
            rpcs.spawn(async move {
                let job = spec(QUEUE, format!("{:.6}", epoch_now()));
                client.enqueue(pb::EnqueueRequest { jobs: vec![job] }).await?;
                drop(slot);
                anyhow::Ok(())
            });
            sent += 1;
        }
        while let Some(done) = rpcs.try_join_next() {
            done??;
        }
    }
    while let Some(done) = rpcs.join_next().await {
        done??;
    }
    Ok(sent)
}

/// Queued jobs of the queue every 100 ms for `duration`.
async fn sample_depth(env: &Env, duration: Duration) -> anyhow::Result<Vec<i64>> {
    let mut depths = Vec::new();
    let mut tick = interval(Duration::from_millis(100));
    let started = Instant::now();
    while started.elapsed() < duration {
        tick.tick().await;
        let depth: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'queued'")
            .bind(QUEUE)
            .fetch_one(&env.pool)
            .await?;
        depths.push(depth);
    }
    Ok(depths)
}
