//! The database limit: the broker's work done in raw SQL on the same Postgres, without broker, gRPC or workers,
//! so every broker figure can be read as a fraction of it. Tables `raw_jobs` and `raw_finished` are copies of the
//! broker's `jobs` and `finished_jobs` (same columns, indexes and defaults), so rows and index upkeep are the same.
//!
//! Measured: single-row insert commits from 8 connections; multi-row inserts of 1000 rows from 4 connections;
//! and the drain: 4 connections each claiming 1000 due jobs with `FOR UPDATE SKIP LOCKED` in priority order (one
//! statement) and completing them by moving them to `raw_finished` (one statement), until none is left.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{env::Env, report::Figure};

const SINGLE_CLIENTS: usize = 8;
const BATCH_CLIENTS: usize = 4;
const DRAIN_CLIENTS: usize = 2;
const BATCH: usize = 1000;
const QUEUE: &str = "raw";

/// The columns a finished job carries over from the live one (as the broker's completion does).
macro_rules! carried {
    () => {
        "id, queue, kind, payload, priority, run_at, max_attempts, lease_ttl_ms, execution_timeout_ms, \
         idempotency_key, initial_backoff_ms, max_backoff_ms, backoff_multiplier, metadata, created_at, attempt, \
         worker_id, lease_id, last_error, progress_percent, progress_message"
    };
}

/// Completes a batch of claimed raw jobs: moves them to `raw_finished`, fenced by lease and state.
const COMPLETE: &str = concat!(
    "WITH ended AS (DELETE FROM raw_jobs WHERE lease_id = ANY($1) AND state = 'leased' RETURNING *) \
     INSERT INTO raw_finished (",
    carried!(),
    ", state, finished_at, result) SELECT ",
    carried!(),
    ", 'succeeded', clock_timestamp(), ''::bytea FROM ended"
);

pub async fn run(env: &Env, single: usize, jobs: usize) -> anyhow::Result<Vec<Figure>> {
    let pool = &env.pool;
    sqlx::query("CREATE TABLE raw_jobs (LIKE jobs INCLUDING ALL)").execute(pool).await?;
    sqlx::query("CREATE TABLE raw_finished (LIKE finished_jobs INCLUDING ALL)").execute(pool).await?;

    let took = insert_all(pool, SINGLE_CLIENTS, single, 1).await?;
    let name = format!("database limit: single-row insert commits, {SINGLE_CLIENTS} connections");
    let mut figures = vec![Figure::rate("db.single_commits", name, single, took)];
    sqlx::query("TRUNCATE raw_jobs").execute(pool).await?;

    let inserted = insert_all(pool, BATCH_CLIENTS, jobs, BATCH).await?;
    let name = format!("database limit: multi-row inserts of {BATCH}, {BATCH_CLIENTS} connections");
    figures.push(Figure::rate("db.insert", name, jobs, inserted));

    let drained = drain(pool, jobs).await?;
    let name = format!("database limit: claim {BATCH} (SKIP LOCKED) + complete, {DRAIN_CLIENTS} connections");
    figures.push(Figure::rate("db.claim_complete", name, jobs, drained));
    let name = "database limit: batched insert → claim → complete";
    figures.push(Figure::rate("db.pipeline", name, jobs, inserted + drained));
    sqlx::query("DROP TABLE raw_jobs, raw_finished").execute(pool).await?;
    Ok(figures)
}

/// Inserts `total` jobs in statements of `chunk` rows from `clients` concurrent connections.
async fn insert_all(pool: &PgPool, clients: usize, total: usize, chunk: usize) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..clients {
        let (next, pool) = (next.clone(), pool.clone());
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(chunk, Ordering::Relaxed);
                if first >= total {
                    return anyhow::Ok(());
                }
                insert(&pool, first, chunk.min(total - first)).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// One statement inserting `count` jobs (UUIDv7 ids, like the broker's), each in its own autocommit.
async fn insert(pool: &PgPool, first: usize, count: usize) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let payloads: Vec<Vec<u8>> = (first..first + count).map(|i| i.to_le_bytes().to_vec()).collect();
    sqlx::query(
        "INSERT INTO raw_jobs (id, queue, kind, payload, priority, run_at, max_attempts, lease_ttl_ms, \
           initial_backoff_ms, max_backoff_ms, backoff_multiplier, metadata, created_at) \
         SELECT id, $3, 'noop', payload, 0, now(), 25, 30000, 1000, 3600000, 2.0, '{}', now() \
         FROM unnest($1::uuid[], $2::bytea[]) AS t(id, payload)",
    )
    .bind(ids)
    .bind(payloads)
    .bind(QUEUE)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims and completes every queued raw job, `BATCH` at a time from `DRAIN_CLIENTS` connections.
async fn drain(pool: &PgPool, jobs: usize) -> anyhow::Result<Duration> {
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for client in 0..DRAIN_CLIENTS {
        let (pool, done) = (pool.clone(), done.clone());
        tasks.spawn(async move {
            loop {
                let leases: Vec<Uuid> = sqlx::query_scalar(
                    "UPDATE raw_jobs SET state = 'leased', attempt = attempt + 1, lease_id = gen_random_uuid(), \
                       worker_id = $3, lease_expires_at = clock_timestamp() + lease_ttl_ms * interval '1 millisecond' \
                     WHERE id IN (SELECT id FROM raw_jobs WHERE queue = $1 AND state = 'queued' \
                       AND run_at <= clock_timestamp() ORDER BY priority DESC, run_at, id LIMIT $2 \
                       FOR UPDATE SKIP LOCKED) \
                     RETURNING lease_id",
                )
                .bind(QUEUE)
                .bind(BATCH as i64)
                .bind(format!("raw-{client}"))
                .fetch_all(&pool)
                .await?;
                if leases.is_empty() {
                    return anyhow::Ok(());
                }
                let completed = sqlx::query(COMPLETE).bind(&leases).execute(&pool).await?.rows_affected();
                anyhow::ensure!(completed == leases.len() as u64, "completed {completed} of {} claims", leases.len());
                done.fetch_add(leases.len(), Ordering::Relaxed);
            }
        });
    }
    while let Some(ended) = tasks.join_next().await {
        ended??;
    }
    let took = started.elapsed();
    let drained = done.load(Ordering::Relaxed);
    anyhow::ensure!(drained == jobs, "the raw drain completed {drained} of {jobs} jobs");
    Ok(took)
}
