//! The statements behind AdminService and the queue settings dispatch and enqueue obey: stats, paging, admin
//! retry and purge, pause and max depth, and the table of connected Lease streams.
//!
//! None of these is on the per-job hot path except [`Store::queued_depths`], which runs once per enqueue batch
//! and only for bounded queues (so it counts at most `max_depth + 1` rows each).

use std::{collections::BTreeMap, time::Duration};

use sqlx::{Row, postgres::PgRow, types::Json};
use uuid::Uuid;

use super::{
    ENQUEUED_CHANNEL, Store, millis,
    rows::{self, finished_job, live_depths, live_job, spec_columns},
};
use crate::{
    error::Result,
    model::{Job, JobState, QueueStats, WorkerInfo},
};

/// A job's size in a page besides its payload, result, last error and metadata: ids, names, key, timestamps,
/// progress and trace context, at most a few KiB.
const JOB_OVERHEAD: i32 = 4096;

/// A worker's size in a page besides its labels, queues and names: ids, numbers, timestamp and the framing of
/// each queue and label.
const WORKER_OVERHEAD: i32 = 1024;

/// A Lease stream as recorded for operators.
#[derive(Debug, Clone)]
pub struct SessionRecord<'a> {
    pub id: Uuid,
    pub replica: &'a str,
    pub worker_id: &'a str,
    pub queues: &'a [String],
    pub capacity: u32,
    pub labels: &'a BTreeMap<String, String>,
}

fn count(row: &PgRow, column: &str) -> Result<u64, sqlx::Error> {
    Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
}

impl Store {
    /// Stats of one queue (`Some`) or of the queues that have jobs or settings, sorted by name: at most `limit`,
    /// those named after `after`.
    pub async fn queue_stats(&self, queue: Option<&str>, after: Option<&str>, limit: i64) -> Result<Vec<QueueStats>> {
        let rows = sqlx::query(concat!(
            "WITH live AS (",
            live_depths!(),
            " WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR queue > $2) GROUP BY queue), \
             finished AS ( \
               SELECT queue, \
                 count(*) FILTER (WHERE state = 'succeeded') AS succeeded, \
                 count(*) FILTER (WHERE state = 'failed') AS failed, \
                 count(*) FILTER (WHERE state = 'cancelled') AS cancelled \
               FROM finished_jobs WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR queue > $2) \
               GROUP BY queue), \
             settings AS (SELECT name AS queue, paused, max_depth FROM queues \
               WHERE ($1::text IS NULL OR name = $1) AND ($2::text IS NULL OR name > $2)), \
             names AS (SELECT queue FROM live UNION SELECT queue FROM finished UNION SELECT queue FROM settings) \
             SELECT n.queue, COALESCE(l.queued, 0) AS queued, COALESCE(l.scheduled, 0) AS scheduled, \
               COALESCE(l.leased, 0) AS leased, COALESCE(f.succeeded, 0) AS succeeded, \
               COALESCE(f.failed, 0) AS failed, COALESCE(f.cancelled, 0) AS cancelled, \
               (extract(epoch FROM clock_timestamp() - l.oldest) * 1000)::float8 AS oldest_ms, \
               COALESCE(s.paused, false) AS paused, s.max_depth \
             FROM names n LEFT JOIN live l USING (queue) LEFT JOIN finished f USING (queue) \
               LEFT JOIN settings s USING (queue) \
             ORDER BY n.queue LIMIT $3"
        ))
        .bind(queue)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let oldest_ms: Option<f64> = row.try_get("oldest_ms")?;
                Ok(QueueStats {
                    queue: row.try_get("queue")?,
                    queued: count(row, "queued")?,
                    scheduled: count(row, "scheduled")?,
                    leased: count(row, "leased")?,
                    succeeded: count(row, "succeeded")?,
                    failed: count(row, "failed")?,
                    cancelled: count(row, "cancelled")?,
                    oldest_queued_age: Duration::from_millis(oldest_ms.unwrap_or(0.0).max(0.0) as u64),
                    paused: row.try_get("paused")?,
                    max_depth: row.try_get::<Option<i64>, _>("max_depth")?.and_then(|d| u64::try_from(d).ok()),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A page of `queue`'s jobs, newest first, with ids below `before`, optionally in one state: at most `limit`,
    /// and after the first only while their sizes (estimated from the large fields, plus [`JOB_OVERHEAD`]) add up to
    /// at most `max_bytes`; jobs past the cut are neither read in full nor sent. True if more jobs follow.
    pub async fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        before: Option<Uuid>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<(Vec<Job>, bool)> {
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let filter = " WHERE queue = $1 AND ($2::text IS NULL OR state = $2) AND ($3::uuid IS NULL OR id < $3) \
                      ORDER BY id DESC LIMIT $4";
        // Metadata as text: its stored size may be compressed far below what a page carries.
        let size = "octet_length(payload) + coalesce(octet_length(last_error), 0) + octet_length(metadata::text)";
        let page = format!(
            "(SELECT {}, {size} + {JOB_OVERHEAD} AS size FROM jobs{filter}) \
             UNION ALL (SELECT {}, {size} + coalesce(octet_length(result), 0) + {JOB_OVERHEAD} AS size \
               FROM finished_jobs{filter}) ORDER BY id DESC LIMIT $4",
            live_job!(),
            finished_job!()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sized_page(&page, "id DESC")))
            .bind(queue)
            .bind(state.map(JobState::as_str))
            .bind(before)
            .bind(i64::from(limit) + 1)
            .bind(max_bytes)
            .fetch_all(&self.pool)
            .await?;
        cut_page(&rows, limit, max_bytes, rows::job)
    }

    /// Admin retry: moves one job (`id`) or every job of `queue` in `state` (FAILED or CANCELLED) back to QUEUED
    /// with attempts starting over, keeping its spec and `run_at`, and wakes the queues' workers on every replica.
    /// Returns the ids re-queued.
    pub async fn retry_finished(
        &self,
        id: Option<Uuid>,
        queue: Option<&str>,
        state: Option<JobState>,
    ) -> Result<Vec<Uuid>> {
        let ids = sqlx::query_scalar(concat!(
            "WITH moved AS ( \
               DELETE FROM finished_jobs \
               WHERE state IN ('failed', 'cancelled') AND ($1::uuid IS NULL OR id = $1) \
                 AND ($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR state = $3) \
               RETURNING *), \
             requeued AS ( \
               INSERT INTO jobs (",
            spec_columns!(),
            ", last_error) SELECT ",
            spec_columns!(),
            ", last_error FROM moved RETURNING id, queue), \
             woken AS ( \
               SELECT pg_notify($4, string_agg(DISTINCT queue, ',')) FROM requeued HAVING count(*) > 0) \
             SELECT id FROM requeued, (SELECT count(*) FROM woken) w"
        ))
        .bind(id)
        .bind(queue)
        .bind(state.map(JobState::as_str))
        .bind(ENQUEUED_CHANNEL)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    /// Deletes `queue`'s terminal jobs (of one state, or all three) and their idempotency keys. Returns how many.
    pub async fn purge_finished(&self, queue: &str, state: Option<JobState>) -> Result<u64> {
        let purged: i64 = sqlx::query_scalar(
            "WITH gone AS ( \
               DELETE FROM finished_jobs WHERE queue = $1 AND ($2::text IS NULL OR state = $2) \
               RETURNING id, queue, idempotency_key), \
             keys AS ( \
               DELETE FROM idempotency_keys k USING gone \
               WHERE k.queue = gone.queue AND k.key = gone.idempotency_key AND k.job_id = gone.id) \
             SELECT count(*) FROM gone",
        )
        .bind(queue)
        .bind(state.map(JobState::as_str))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(purged).unwrap_or(0))
    }

    /// Pauses or resumes a queue on every replica; resuming NOTIFYs its workers.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        sqlx::query(
            "WITH set AS ( \
               INSERT INTO queues (name, paused) VALUES ($1, $2) \
               ON CONFLICT (name) DO UPDATE SET paused = $2, updated_at = now() RETURNING name) \
             SELECT pg_notify($3, name) FROM set WHERE NOT $2",
        )
        .bind(queue)
        .bind(paused)
        .bind(ENQUEUED_CHANNEL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Bounds a queue's QUEUED jobs (`None` removes the bound).
    pub async fn set_max_depth(&self, queue: &str, max_depth: Option<u64>) -> Result<()> {
        sqlx::query(
            "INSERT INTO queues (name, max_depth) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET max_depth = $2, updated_at = now()",
        )
        .bind(queue)
        .bind(max_depth.map(|d| i64::try_from(d).unwrap_or(i64::MAX)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every queue that has a max depth.
    pub async fn queue_bounds(&self) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, max_depth FROM queues WHERE max_depth IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(name, depth)| (name, u64::try_from(depth).unwrap_or(0))).collect())
    }

    /// Once per enqueue batch, bounded queues only: see [`queued_depths`].
    pub async fn queued_depths(&self, bounds: &[(&str, u64)]) -> Result<Vec<(String, u64)>> {
        queued_depths(&self.pool, bounds).await
    }

    /// Records a new Lease stream.
    pub async fn insert_session(&self, session: &SessionRecord<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO worker_sessions (id, replica, worker_id, queues, capacity, labels) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(session.id)
        .bind(session.replica)
        .bind(session.worker_id)
        .bind(session.queues)
        .bind(i32::try_from(session.capacity).unwrap_or(i32::MAX))
        .bind(Json(session.labels))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_session_capacity(&self, id: Uuid, capacity: u32) -> Result<()> {
        sqlx::query("UPDATE worker_sessions SET capacity = $2 WHERE id = $1")
            .bind(id)
            .bind(i32::try_from(capacity).unwrap_or(i32::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_session(&self, id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM worker_sessions WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Marks `replica`'s streams as alive and removes streams of any replica not seen for `stale`.
    pub async fn refresh_sessions(&self, replica: &str, stale: Duration) -> Result<()> {
        sqlx::query(
            "WITH seen AS (UPDATE worker_sessions SET seen_at = clock_timestamp() WHERE replica = $1) \
             DELETE FROM worker_sessions WHERE seen_at < clock_timestamp() - $2 * interval '1 millisecond'",
        )
        .bind(replica)
        .bind(millis(stale))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A page of the Lease streams seen within `stale`, oldest first (by session id, which is time-ordered), with
    /// session ids above `after`, optionally only those taking from `queue`: at most `limit`, and after the first
    /// only while their sizes (labels, queues and names, plus [`WORKER_OVERHEAD`]) add up to at most `max_bytes`.
    /// True if more streams follow.
    pub async fn list_workers(
        &self,
        queue: Option<&str>,
        stale: Duration,
        after: Option<Uuid>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<(Vec<WorkerInfo>, bool)> {
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        // Leases held are counted over the leased rows only (`lease_id IS NOT NULL` is `jobs_lease`'s predicate).
        let page = format!(
            "SELECT w.id, w.worker_id, w.queues, w.capacity, w.connected_at, w.replica, w.labels, \
               COALESCE(l.held, 0) AS held, \
               octet_length(w.worker_id) + octet_length(w.replica) + octet_length(w.queues::text) \
                 + octet_length(w.labels::text) + {WORKER_OVERHEAD} AS size \
             FROM worker_sessions w LEFT JOIN ( \
               SELECT session_id, count(*) AS held FROM jobs \
               WHERE state = 'leased' AND lease_id IS NOT NULL GROUP BY session_id) l \
               ON l.session_id = w.id \
             WHERE w.seen_at >= clock_timestamp() - $1 * interval '1 millisecond' \
               AND ($2::text IS NULL OR $2 = ANY (w.queues)) AND ($3::uuid IS NULL OR w.id > $3) \
             ORDER BY w.id LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sized_page(&page, "id")))
            .bind(millis(stale))
            .bind(queue)
            .bind(after)
            .bind(i64::from(limit) + 1)
            .bind(max_bytes)
            .fetch_all(&self.pool)
            .await?;
        cut_page(&rows, limit, max_bytes, |row| {
            let Json(labels): Json<BTreeMap<String, String>> = row.try_get("labels")?;
            Ok(WorkerInfo {
                session_id: row.try_get("id")?,
                worker_id: row.try_get("worker_id")?,
                queues: row.try_get("queues")?,
                capacity: u32::try_from(row.try_get::<i32, _>("capacity")?).unwrap_or(0),
                leases_held: u32::try_from(count(row, "held")?).unwrap_or(u32::MAX),
                connected_at: row.try_get("connected_at")?,
                replica: row.try_get("replica")?,
                labels,
            })
        })
    }
}

/// Wraps `page` (a query for one row more than a page, each with its `size`, in `order`) so that each row also
/// carries the `running` total of sizes up to it, and rows that start past `$5` bytes are not returned at all.
fn sized_page(page: &str, order: &str) -> String {
    format!(
        "WITH page AS ({page}), sized AS (SELECT page.*, sum(size) OVER (ORDER BY {order}) AS running FROM page) \
         SELECT * FROM sized WHERE running - size < $5 ORDER BY {order}"
    )
}

/// The page in rows from [`sized_page`]: at most `limit` rows and, past the first, only while the running total
/// stays within `max_bytes`. True if rows follow the page.
fn cut_page<T>(
    rows: &[PgRow],
    limit: u32,
    max_bytes: i64,
    parse: impl Fn(&PgRow) -> Result<T, sqlx::Error>,
) -> Result<(Vec<T>, bool)> {
    let mut items = Vec::new();
    for row in rows {
        let running: i64 = row.try_get("running")?;
        if items.len() == limit as usize || (!items.is_empty() && running > max_bytes) {
            break;
        }
        items.push(parse(row)?);
    }
    let more = rows.len() > items.len();
    Ok((items, more))
}

/// The QUEUED jobs of each `(queue, max depth)`, counted up to one past the max: enough to tell a full queue, and
/// a deep queue costs no more than its bound.
pub(super) async fn queued_depths<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    bounds: &[(&str, u64)],
) -> Result<Vec<(String, u64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.name, (SELECT count(*) FROM ( \
           SELECT 1 FROM jobs WHERE queue = c.name AND state = 'queued' LIMIT c.cap) x) \
         FROM unnest($1::text[], $2::bigint[]) AS c(name, cap)",
    )
    .bind(bounds.iter().map(|(name, _)| *name).collect::<Vec<_>>())
    .bind(bounds.iter().map(|(_, max)| i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX)).collect::<Vec<_>>())
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|(name, depth)| (name, u64::try_from(depth).unwrap_or(0))).collect())
}
