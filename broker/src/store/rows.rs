//! Column lists shared by the statements, and decoding rows into [`crate::model`] types.
//!
//! A job lives in `jobs` while QUEUED or LEASED and in `finished_jobs` once terminal; both are read into the same
//! [`Job`] shape. Nothing here talks to the database.

use std::{collections::BTreeMap, time::Duration};

use sqlx::{Row, postgres::PgRow, types::Json};

use crate::model::{Job, JobSpec, JobState, LeaseFacts, NewJob, Progress, RetryPolicy, TraceContext};

/// Columns fixed at enqueue: what a job is, as opposed to how its attempts went.
macro_rules! spec_columns {
    () => {
        "id, queue, kind, payload, priority, run_at, max_attempts, lease_ttl_ms, execution_timeout_ms, \
         idempotency_key, initial_backoff_ms, max_backoff_ms, backoff_multiplier, metadata, created_at, \
         traceparent, tracestate"
    };
}

/// Columns a job keeps when it moves from `jobs` to `finished_jobs`.
macro_rules! carried_columns {
    () => {
        concat!(
            $crate::store::rows::spec_columns!(),
            ", attempt, worker_id, lease_id, progress_percent, progress_message"
        )
    };
}

/// A live job read as a whole [`Job`].
macro_rules! live_job {
    () => {
        concat!(
            $crate::store::rows::carried_columns!(),
            ", last_error, state, lease_expires_at, cancel_requested, NULL::timestamptz AS finished_at, \
             NULL::bytea AS result, leased_at"
        )
    };
}

/// A finished job read as a whole [`Job`].
macro_rules! finished_job {
    () => {
        concat!(
            $crate::store::rows::carried_columns!(),
            ", last_error, state, NULL::timestamptz AS lease_expires_at, false AS cancel_requested, finished_at, result, \
             NULL::timestamptz AS leased_at"
        )
    };
}

/// Live jobs per queue: `queued` (due), `scheduled`, `leased`, and `oldest`, the earliest due `run_at` of a QUEUED
/// job. The statement adds any `WHERE` and the `GROUP BY queue`.
macro_rules! live_depths {
    () => {
        "SELECT queue, \
           count(*) FILTER (WHERE state = 'queued' AND run_at <= clock_timestamp()) AS queued, \
           count(*) FILTER (WHERE state = 'queued' AND run_at > clock_timestamp()) AS scheduled, \
           count(*) FILTER (WHERE state = 'leased') AS leased, \
           min(run_at) FILTER (WHERE state = 'queued' AND run_at <= clock_timestamp()) AS oldest \
         FROM jobs"
    };
}

/// What the retry policy needs about a leased job.
macro_rules! lease_facts {
    () => {
        "lease_id, id, attempt, max_attempts, initial_backoff_ms, max_backoff_ms, backoff_multiplier, \
         (attempt_deadline IS NOT NULL AND attempt_deadline <= lease_expires_at) AS timed_out"
    };
}

pub(super) use {carried_columns, finished_job, lease_facts, live_depths, live_job, spec_columns};

pub(super) fn duration(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn count(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn state(text: &str) -> Result<JobState, sqlx::Error> {
    JobState::parse(text).ok_or_else(|| sqlx::Error::Decode(format!("unknown job state `{text}`").into()))
}

fn retry(row: &PgRow) -> Result<RetryPolicy, sqlx::Error> {
    Ok(RetryPolicy {
        initial: duration(row.try_get("initial_backoff_ms")?),
        max: duration(row.try_get("max_backoff_ms")?),
        multiplier: row.try_get("backoff_multiplier")?,
    })
}

/// A job leased by its own insert: what the producer sent, plus the row's `id`, `created_at`, `run_at`, `lease_id`,
/// `leased_at` and `lease_expires_at` as the database stamped them.
pub(super) fn leased_at_insert(row: &PgRow, new: &NewJob) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: new.id,
        spec: new.spec.clone(),
        state: JobState::Leased,
        attempt: 1,
        created_at: row.try_get("created_at")?,
        run_at: row.try_get("run_at")?,
        worker_id: new.lease_to.as_ref().map(|slot| slot.worker_id.clone()),
        lease_id: row.try_get("lease_id")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        finished_at: None,
        last_error: None,
        result: None,
        progress: None,
        cancel_requested: false,
        leased_at: row.try_get("leased_at")?,
        trace: new.trace.clone(),
    })
}

/// Decodes a row selected with `live_job!()` or `finished_job!()`.
pub(super) fn job(row: &PgRow) -> Result<Job, sqlx::Error> {
    let Json(metadata): Json<BTreeMap<String, String>> = row.try_get("metadata")?;
    let progress = match row.try_get::<Option<i32>, _>("progress_percent")? {
        Some(percent) => Some(Progress {
            percent: count(percent),
            message: row.try_get::<Option<String>, _>("progress_message")?.unwrap_or_default(),
        }),
        None => None,
    };
    let trace = match row.try_get::<Option<String>, _>("traceparent")? {
        Some(traceparent) => Some(TraceContext { traceparent, tracestate: row.try_get("tracestate")? }),
        None => None,
    };
    Ok(Job {
        id: row.try_get("id")?,
        spec: JobSpec {
            queue: row.try_get("queue")?,
            kind: row.try_get("kind")?,
            payload: row.try_get("payload")?,
            priority: row.try_get("priority")?,
            max_attempts: count(row.try_get("max_attempts")?),
            lease_ttl: duration(row.try_get("lease_ttl_ms")?),
            execution_timeout: row.try_get::<Option<i64>, _>("execution_timeout_ms")?.map(duration),
            idempotency_key: row.try_get("idempotency_key")?,
            retry: retry(row)?,
            metadata,
        },
        state: state(row.try_get("state")?)?,
        attempt: count(row.try_get("attempt")?),
        created_at: row.try_get("created_at")?,
        run_at: row.try_get("run_at")?,
        worker_id: row.try_get("worker_id")?,
        lease_id: row.try_get("lease_id")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        finished_at: row.try_get("finished_at")?,
        last_error: row.try_get("last_error")?,
        result: row.try_get("result")?,
        progress,
        cancel_requested: row.try_get("cancel_requested")?,
        leased_at: row.try_get("leased_at")?,
        trace,
    })
}

/// Decodes a row selected with `lease_facts!()`.
pub(super) fn facts(row: &PgRow) -> Result<LeaseFacts, sqlx::Error> {
    Ok(LeaseFacts {
        lease_id: row.try_get("lease_id")?,
        job_id: row.try_get("id")?,
        attempt: count(row.try_get("attempt")?),
        max_attempts: count(row.try_get("max_attempts")?),
        retry: retry(row)?,
        timed_out: row.try_get("timed_out")?,
    })
}

pub(super) fn job_state(row: &PgRow, column: &str) -> Result<JobState, sqlx::Error> {
    state(row.try_get(column)?)
}
