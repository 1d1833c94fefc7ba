//! The statements on jobs: insert, claim, heartbeat, settle, cancel, reap, retention, reads.
//!
//! Every fenced write names `lease_id` and `state = 'leased'` in the same statement that writes; the rows it
//! returns are the leases that held. Statements marked "hot" run once per batch, never once per job.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use sqlx::{Encode, PgExecutor, Postgres, Row, Type, postgres::PgArguments, query::Query, types::Json};
use uuid::Uuid;

use super::{
    Store, millis, retry_deadlocks,
    rows::{self, carried_columns, finished_job, lease_facts, live_job, spec_columns},
};
use crate::{
    error::Result,
    model::{Beat, BeatAnswer, Job, LeaseFacts, NewJob, Settle, SettleLease, Settled, Slot},
};

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// An idempotency key already held by a retained job.
#[derive(Debug, Clone)]
pub struct KeyHolder {
    pub queue: String,
    pub key: String,
    pub job_id: Uuid,
    pub spec_hash: Vec<u8>,
}

/// A key a new job takes.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub queue: String,
    pub key: String,
    pub job_id: Uuid,
    pub spec_hash: Vec<u8>,
}

/// What a claim leased, and whether more due jobs were waiting than it had slots for.
#[derive(Debug)]
pub struct Claimed {
    /// Each leased job with the index of the slot it went to.
    pub jobs: Vec<(usize, Job)>,
    pub more: bool,
}

/// How an insert batch ended.
#[derive(Debug, PartialEq)]
pub enum Inserted {
    /// Stored; the jobs leased by the insert itself.
    Committed(Vec<Job>),
    /// Another transaction took one of the keys first, or filled a bounded queue past what the plan saw; nothing
    /// was written. Plan again.
    Raced,
}

/// A bounded queue an insert batch adds to: it may hold at most `max` QUEUED jobs once the batch is in.
pub struct Bound {
    pub queue: String,
    pub adds: u64,
    pub max: u64,
}

impl Store {
    /// Which of these `(queue, key)` pairs are already taken, and by whom.
    pub async fn lookup_keys(&self, pairs: &[(String, String)]) -> Result<Vec<KeyHolder>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let (queues, keys): (Vec<String>, Vec<String>) = pairs.iter().cloned().unzip();
        let rows = sqlx::query(
            "SELECT k.queue, k.key, k.job_id, k.spec_hash FROM idempotency_keys k \
             JOIN unnest($1::text[], $2::text[]) AS p(queue, key) ON k.queue = p.queue AND k.key = p.key",
        )
        .bind(queues)
        .bind(keys)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(KeyHolder {
                    queue: row.try_get("queue")?,
                    key: row.try_get("key")?,
                    job_id: row.try_get("job_id")?,
                    spec_hash: row.try_get("spec_hash")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Hot (group commit): stores every job of a batch (leasing those with a `lease_to` slot), its keys and one
    /// NOTIFY naming the queues of its queued jobs, atomically. Without keys or bounds that is a single statement
    /// (one round trip); otherwise a short transaction. `bounds` are checked under a transaction-scoped advisory
    /// lock per queue (taken in name order, before any key), so enqueues on every replica admit jobs to a bounded
    /// queue one batch at a time and its bound holds exactly.
    pub async fn insert_jobs(
        &self,
        jobs: &[NewJob],
        keys: &[NewKey],
        bounds: &[Bound],
        notify: Option<&str>,
    ) -> Result<Inserted> {
        if keys.is_empty() && bounds.is_empty() {
            return Ok(Inserted::Committed(insert_and_notify(&self.pool, jobs, notify).await?));
        }
        let mut tx = self.pool.begin().await?;
        if !bounds.is_empty() {
            let mut queues: Vec<&str> = bounds.iter().map(|b| b.queue.as_str()).collect();
            queues.sort_unstable();
            for queue in queues {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('jobbroker queue bound ' || $1, 0))")
                    .bind(queue)
                    .execute(&mut *tx)
                    .await?;
            }
            let maxima: Vec<(&str, u64)> = bounds.iter().map(|b| (b.queue.as_str(), b.max)).collect();
            let depths: HashMap<String, u64> =
                super::admin::queued_depths(&mut *tx, &maxima).await?.into_iter().collect();
            if bounds.iter().any(|b| depths.get(&b.queue).copied().unwrap_or(0) + b.adds > b.max) {
                tx.rollback().await?;
                return Ok(Inserted::Raced);
            }
        }
        if !keys.is_empty() {
            let taken = sqlx::query(
                "INSERT INTO idempotency_keys (queue, key, job_id, spec_hash) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::bytea[]) ON CONFLICT DO NOTHING",
            )
            .bind(keys.iter().map(|k| k.queue.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.job_id).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.spec_hash.as_slice()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            if taken.rows_affected() != keys.len() as u64 {
                tx.rollback().await?;
                return Ok(Inserted::Raced);
            }
        }
        let leased = insert_and_notify(&mut *tx, jobs, notify).await?;
        tx.commit().await?;
        Ok(Inserted::Committed(leased))
    }

    /// Hot: leases due jobs of `queues` (paused ones skipped) to the given free slots in one statement, best job to
    /// the first slot. It looks at one due job more than there are slots, to tell whether more are waiting. The
    /// picked rows are updated at the row address (`ctid`) their lock returned: no second index lookup per job. A
    /// row changed after the statement's snapshot and still due (leased and released again by another replica in
    /// that instant) is locked at an address the update cannot see (see [`at_address_then_by_key`]). That job stays
    /// QUEUED and counts as seen but not claimed, which calls for the next claim at once; unless the claim leased
    /// nothing at all, which cannot tell: then the job waits for the next wake or poll.
    pub async fn claim(&self, queues: &[String], slots: &[Slot]) -> Result<Claimed> {
        let rows = sqlx::query(concat!(
            "WITH slots AS ( \
               SELECT slot_session, slot_worker, slot \
               FROM unnest($2::uuid[], $3::text[]) WITH ORDINALITY AS s(slot_session, slot_worker, slot)), \
             open_queues AS ( \
               SELECT name FROM unnest($1::text[]) AS q(name) \
               WHERE NOT EXISTS (SELECT 1 FROM queues p WHERE p.name = q.name AND p.paused)), \
             candidates AS ( \
               SELECT c.* FROM open_queues q CROSS JOIN LATERAL ( \
                 SELECT ctid AS pick, priority AS pick_priority, run_at AS pick_run_at, id AS pick_id FROM jobs \
                 WHERE queue = q.name AND state = 'queued' AND run_at <= clock_timestamp() \
                 ORDER BY priority DESC, run_at, id LIMIT $4 + 1 FOR UPDATE SKIP LOCKED) c), \
             picked AS ( \
               SELECT pick, row_number() OVER (ORDER BY pick_priority DESC, pick_run_at, pick_id) AS slot \
               FROM candidates), \
             seen AS (SELECT count(*) AS seen FROM candidates) \
             UPDATE jobs SET state = 'leased', attempt = attempt + 1, lease_id = gen_random_uuid(), \
               leased_at = clock_timestamp(), \
               session_id = slot_session, worker_id = slot_worker, progress_percent = NULL, \
               progress_message = NULL, \
               attempt_deadline = clock_timestamp() + execution_timeout_ms * interval '1 millisecond', \
               lease_expires_at = LEAST(clock_timestamp() + lease_ttl_ms * interval '1 millisecond', \
                 clock_timestamp() + execution_timeout_ms * interval '1 millisecond') \
             FROM picked JOIN slots USING (slot) CROSS JOIN seen WHERE ctid = pick \
             RETURNING slot, seen, ",
            live_job!()
        ))
        .bind(queues)
        .bind(slots.iter().map(|s| s.session_id).collect::<Vec<_>>())
        .bind(slots.iter().map(|s| s.worker_id.as_str()).collect::<Vec<_>>())
        .bind(slots.len() as i64)
        .fetch_all(&self.claims)
        .await?;
        let seen = match rows.first() {
            Some(row) => usize::try_from(row.try_get::<i64, _>("seen")?).unwrap_or(0),
            None => 0,
        };
        let jobs = rows
            .iter()
            .map(|row| Ok((usize::try_from(row.try_get::<i64, _>("slot")? - 1).unwrap_or(0), rows::job(row)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Claimed { more: seen > jobs.len(), jobs })
    }

    /// How long until the next scheduled job of `queues` is due, by the database clock.
    pub async fn next_due(&self, queues: &[String]) -> Result<Option<Duration>> {
        let ms: Option<f64> = sqlx::query_scalar(
            // `extract` answers numeric since Postgres 14; float8 is what decodes into f64.
            "SELECT (extract(epoch FROM min(run_at) - clock_timestamp()) * 1000)::float8 FROM jobs \
             WHERE queue = ANY($1) AND state = 'queued' \
               AND NOT EXISTS (SELECT 1 FROM queues p WHERE p.name = jobs.queue AND p.paused)",
        )
        .bind(queues)
        .fetch_one(&self.pool)
        .await?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }

    /// Hot: extends every lease of a heartbeat batch and records progress. Leases not current are absent.
    pub async fn heartbeat(&self, beats: &[Beat]) -> Result<Vec<BeatAnswer>> {
        at_address_then_by_key(
            beats,
            |beat| beat.lease_id,
            |answer: &BeatAnswer| answer.lease_id,
            |found, beats| self.heartbeat_statement(found, beats),
        )
        .await
    }

    async fn heartbeat_statement(&self, found: Found, beats: Vec<&Beat>) -> Result<Vec<BeatAnswer>> {
        let lease_ids: Vec<Uuid> = beats.iter().map(|b| b.lease_id).collect();
        let percents: Vec<Option<i32>> = beats.iter().map(|b| b.progress.as_ref().map(|p| p.percent as i32)).collect();
        let messages: Vec<Option<&str>> =
            beats.iter().map(|b| b.progress.as_ref().map(|p| p.message.as_str())).collect();
        // Each lease is looked up and locked by itself, then updated where `found` says, as in `settle`.
        macro_rules! heartbeat {
            ($found:literal) => {
                concat!(
                    "WITH held AS MATERIALIZED ( \
                       SELECT b.percent, b.message, l.row_tid, l.job_id \
                       FROM unnest($1::uuid[], $2::int[], $3::text[]) AS b(beat_lease, percent, message) \
                       CROSS JOIN LATERAL ( \
                         SELECT ctid AS row_tid, id AS job_id FROM jobs \
                         WHERE lease_id = b.beat_lease AND state = 'leased' FOR UPDATE) l) \
                     UPDATE jobs j SET \
                       lease_expires_at = LEAST(clock_timestamp() + lease_ttl_ms * interval '1 millisecond', \
                         attempt_deadline), \
                       progress_percent = COALESCE(h.percent, progress_percent), \
                       progress_message = COALESCE(h.message, progress_message) \
                     FROM held h WHERE ",
                    $found,
                    " RETURNING lease_id, id, lease_expires_at, cancel_requested, \
                       lease_expires_at > clock_timestamp() AS active"
                )
            };
        }
        let statement = match found {
            Found::AtAddress => heartbeat!("j.ctid = h.row_tid"),
            Found::ByKey => heartbeat!("j.id = h.job_id"),
        };
        let rows = retry_deadlocks(|| {
            sqlx::query(statement).bind(&lease_ids).bind(&percents).bind(&messages).fetch_all(&self.pool)
        })
        .await?;
        rows.iter()
            .map(|row| {
                Ok(BeatAnswer {
                    lease_id: row.try_get("lease_id")?,
                    job_id: row.try_get("id")?,
                    lease_expires_at: row.try_get("lease_expires_at")?,
                    active: row.try_get("active")?,
                    cancel_requested: row.try_get("cancel_requested")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// What the retry policy needs about these leases, for those that are still current.
    pub async fn lease_facts(&self, lease_ids: &[Uuid]) -> Result<Vec<LeaseFacts>> {
        let rows =
            sqlx::query(concat!("SELECT ", lease_facts!(), " FROM jobs WHERE lease_id = ANY($1) AND state = 'leased'"))
                .bind(lease_ids)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(rows::facts).collect::<Result<_, sqlx::Error>>().map_err(Into::into)
    }

    /// Leases whose deadline has passed (the reaper's work list), oldest first.
    pub async fn expired_leases(&self, limit: u32) -> Result<Vec<LeaseFacts>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            lease_facts!(),
            // `lease_id IS NOT NULL` is the predicate of `jobs_lease`: the scan visits the leased rows only. No index
            // on the deadline: every claim would write one more index entry, and no heartbeat could be a HOT update.
            " FROM jobs WHERE state = 'leased' AND lease_id IS NOT NULL \
               AND lease_expires_at <= clock_timestamp() \
              ORDER BY lease_expires_at LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::facts).collect::<Result<_, sqlx::Error>>().map_err(Into::into)
    }

    /// Hot: ends or re-queues every lease of a batch in one fenced statement. A job whose cancel was requested
    /// ends CANCELLED whatever the outcome. Terminal jobs move to `finished_jobs`. Leases that did not hold are
    /// absent from the answer. Its cost stays proportional to the batch whatever the planner's statistics say:
    /// each lease is looked up and locked by itself (`held`: a lateral probe of the `lease_id` index per input
    /// row, which no join strategy can turn into a scan of every leased row), the rows are then ended or re-queued
    /// where `found` says (see [`at_address_then_by_key`]), and the answer is read from `ended` itself (Postgres
    /// runs the insert into `finished_jobs` to completion although nothing reads it) rather than joined with it.
    pub async fn settle(&self, items: &[SettleLease]) -> Result<Vec<Settled>> {
        at_address_then_by_key(
            items,
            |item| item.lease_id,
            |settled: &Settled| settled.lease_id,
            |found, items| self.settle_statement(found, items),
        )
        .await
    }

    async fn settle_statement(&self, found: Found, items: Vec<&SettleLease>) -> Result<Vec<Settled>> {
        let mut actions = Vec::with_capacity(items.len());
        let mut delays = Vec::with_capacity(items.len());
        let mut results: Vec<Option<&[u8]>> = Vec::with_capacity(items.len());
        let mut errors: Vec<Option<&str>> = Vec::with_capacity(items.len());
        for item in &items {
            let (action, delay, result, error) = match &item.settle {
                Settle::Succeed { result } => ("succeed", 0, Some(result.as_slice()), None),
                Settle::Retry { delay, error } => ("retry", millis(*delay), None, Some(error.as_str())),
                Settle::Fail { error } => ("fail", 0, None, Some(error.as_str())),
                Settle::Release => ("release", 0, None, None),
            };
            actions.push(action);
            delays.push(delay);
            results.push(result);
            errors.push(error);
        }
        let lease_ids: Vec<Uuid> = items.iter().map(|i| i.lease_id).collect();
        let only_if_expired: Vec<bool> = items.iter().map(|i| i.only_if_expired).collect();
        macro_rules! settle {
            ($found:literal) => {
                concat!(
                    "WITH input AS ( \
                   SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::bytea[], $5::text[], $6::bool[]) \
                   AS i(in_lease, action, delay_ms, new_result, error, only_if_expired)), \
                 held AS MATERIALIZED ( \
                   SELECT i.*, l.row_tid, l.job_id, l.ends FROM input i CROSS JOIN LATERAL ( \
                     SELECT ctid AS row_tid, id AS job_id, \
                       (i.action IN ('succeed', 'fail') OR cancel_requested) AS ends FROM jobs \
                     WHERE lease_id = i.in_lease AND state = 'leased' \
                       AND (NOT i.only_if_expired OR lease_expires_at <= clock_timestamp()) \
                     FOR UPDATE) l), \
                 ended AS ( \
                   DELETE FROM jobs j USING held h WHERE h.ends AND ", $found, " \
                   RETURNING j.*, h.action, h.new_result, h.error, \
                     CASE WHEN j.cancel_requested THEN 'cancelled' WHEN h.action = 'succeed' THEN 'succeeded' \
                          ELSE 'failed' END AS end_state, \
                     extract(epoch FROM clock_timestamp() - j.leased_at)::float8 AS held_s), \
                 finished AS ( \
                   INSERT INTO finished_jobs (",
                    carried_columns!(),
                    ", last_error, state, finished_at, result) SELECT ",
                    carried_columns!(),
                    ", COALESCE(error, last_error), end_state, clock_timestamp(), \
                     CASE WHEN end_state = 'succeeded' THEN new_result END \
                   FROM ended), \
                 requeued AS ( \
                   UPDATE jobs j SET state = 'queued', \
                     run_at = clock_timestamp() + h.delay_ms * interval '1 millisecond', \
                     attempt = CASE WHEN h.action = 'release' THEN j.attempt - 1 ELSE j.attempt END, \
                     last_error = COALESCE(h.error, j.last_error), lease_id = NULL, session_id = NULL, \
                     lease_expires_at = NULL, attempt_deadline = NULL \
                   FROM held h WHERE NOT h.ends AND ", $found, " \
                   RETURNING h.in_lease AS lease_id, j.id, j.state, j.queue, \
                     extract(epoch FROM clock_timestamp() - j.leased_at)::float8 AS held_s) \
                 SELECT lease_id, id, end_state AS state, queue, held_s FROM ended \
                 UNION ALL SELECT lease_id, id, state, queue, held_s FROM requeued"
                )
            };
        }
        let statement = match found {
            Found::AtAddress => settle!("j.ctid = h.row_tid"),
            Found::ByKey => settle!("j.id = h.job_id"),
        };
        let rows = retry_deadlocks(|| {
            sqlx::query(statement)
                .bind(&lease_ids)
                .bind(&actions)
                .bind(&delays)
                .bind(&results)
                .bind(&errors)
                .bind(&only_if_expired)
                .fetch_all(&self.pool)
        })
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Settled {
                    lease_id: row.try_get("lease_id")?,
                    job_id: row.try_get("id")?,
                    state: rows::job_state(row, "state")?,
                    queue: row.try_get("queue")?,
                    held: row.try_get::<Option<f64>, _>("held_s")?.map(|s| Duration::from_secs_f64(s.max(0.0))),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A Lease stream closed: its leases now expire within `grace` unless the worker heartbeats them again.
    /// Only leases still delivered on that stream are touched (a reconnected worker may have adopted them).
    pub async fn shorten_leases(&self, session_id: Uuid, lease_ids: &[Uuid], grace: Duration) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = \
               LEAST(lease_expires_at, clock_timestamp() + $3 * interval '1 millisecond') \
             WHERE lease_id = ANY($2) AND session_id = $1 AND state = 'leased'",
        )
        .bind(session_id)
        .bind(lease_ids)
        .bind(millis(grace))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// A reconnected worker names the leases it still runs: move those still current to its new stream.
    /// Returns `(lease_id, job_id, lease_ttl)` of each adopted lease.
    pub async fn adopt_leases(
        &self,
        session_id: Uuid,
        worker_id: &str,
        lease_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, Uuid, Duration)>> {
        let adopted: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
            "UPDATE jobs SET session_id = $1, worker_id = $2 \
             WHERE lease_id = ANY($3) AND state = 'leased' RETURNING lease_id, id, lease_ttl_ms",
        )
        .bind(session_id)
        .bind(worker_id)
        .bind(lease_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(adopted.into_iter().map(|(lease_id, job_id, ttl)| (lease_id, job_id, rows::duration(ttl))).collect())
    }

    /// Which of these leases are still current (for leases settled through another replica).
    pub async fn current_leases(&self, lease_ids: &[Uuid]) -> Result<HashSet<Uuid>> {
        let current: Vec<Uuid> =
            sqlx::query_scalar("SELECT lease_id FROM jobs WHERE lease_id = ANY($1) AND state = 'leased'")
                .bind(lease_ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(current.into_iter().collect())
    }

    /// One job, live or finished.
    pub async fn job(&self, id: Uuid) -> Result<Option<Job>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            live_job!(),
            " FROM jobs WHERE id = $1 UNION ALL SELECT ",
            finished_job!(),
            " FROM finished_jobs WHERE id = $1 LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::job).transpose().map_err(Into::into)
    }

    /// For each of `ids` still stored, a hash of what a watcher is shown of it: state, attempt, progress, cancel
    /// request, last error, worker and `run_at` (a heartbeat that only moves the deadline does not change it).
    /// The same fields as `observable` in `domain/mod.rs`, which decides what a watcher is sent: change both.
    pub async fn watch_marks(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>> {
        let marks = sqlx::query_as(
            "SELECT id, hashtextextended(ROW(state, attempt, progress_percent, progress_message, cancel_requested, \
               last_error, worker_id, run_at)::text, 0) FROM jobs WHERE id = ANY($1) \
             UNION ALL \
             SELECT id, hashtextextended(ROW(state, attempt, progress_percent, progress_message, false, \
               last_error, worker_id, run_at)::text, 0) FROM finished_jobs WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(marks)
    }

    /// Cancels a QUEUED job at once (it moves to `finished_jobs`). False if it was not QUEUED.
    pub async fn cancel_queued(&self, id: Uuid) -> Result<bool> {
        let done = sqlx::query(concat!(
            "WITH moved AS (DELETE FROM jobs WHERE id = $1 AND state = 'queued' RETURNING *) \
             INSERT INTO finished_jobs (",
            carried_columns!(),
            ", last_error, state, finished_at) SELECT ",
            carried_columns!(),
            ", last_error, 'cancelled', clock_timestamp() FROM moved"
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a LEASED job as cancel-requested and tells every replica (NOTIFY) so the holder's stream hears of
    /// it. Returns the lease, or `None` if the job was not LEASED.
    pub async fn request_cancel(&self, id: Uuid) -> Result<Option<Uuid>> {
        let lease = sqlx::query_scalar(
            "WITH c AS (UPDATE jobs SET cancel_requested = true WHERE id = $1 AND state = 'leased' \
               RETURNING lease_id) \
             SELECT lease_id FROM c, LATERAL (SELECT pg_notify($2, lease_id::text)) n",
        )
        .bind(id)
        .bind(super::CANCEL_CHANNEL)
        .fetch_optional(&self.pool)
        .await?;
        Ok(lease)
    }

    /// Retention: deletes up to `limit` jobs finished more than `retention` ago, with their idempotency keys.
    /// There is no index on `finished_at` alone (each would cost every completion one more index entry): the
    /// statement walks `finished_jobs_queue_state` one `(queue, state)` group after another (a loose index scan,
    /// so it reads one entry per group to find them) and takes each group's oldest rows by a range scan. The
    /// cut-off is read once, as a parameter, so that it bounds the range scans.
    pub async fn delete_finished_before(&self, retention: Duration, limit: u32) -> Result<u64> {
        let deleted: i64 = sqlx::query_scalar(
            "WITH RECURSIVE groups AS ( \
               (SELECT queue, state FROM finished_jobs ORDER BY queue, state LIMIT 1) \
               UNION ALL \
               SELECT n.queue, n.state FROM groups g CROSS JOIN LATERAL ( \
                 SELECT f.queue, f.state FROM finished_jobs f WHERE (f.queue, f.state) > (g.queue, g.state) \
                 ORDER BY f.queue, f.state LIMIT 1) n), \
             cutoff AS (SELECT clock_timestamp() - $1 * interval '1 millisecond' AS before), \
             doomed AS ( \
               SELECT old.id FROM groups g CROSS JOIN LATERAL ( \
                 SELECT f.id FROM finished_jobs f \
                 WHERE f.queue = g.queue AND f.state = g.state AND f.finished_at < (SELECT before FROM cutoff) \
                 ORDER BY f.finished_at LIMIT $2 FOR UPDATE SKIP LOCKED) old \
               LIMIT $2), \
             gone AS ( \
               DELETE FROM finished_jobs WHERE id IN (SELECT id FROM doomed) \
               RETURNING id, queue, idempotency_key), \
             keys AS ( \
               DELETE FROM idempotency_keys k USING gone \
               WHERE k.queue = gone.queue AND k.key = gone.idempotency_key AND k.job_id = gone.id) \
             SELECT count(*) FROM gone",
        )
        .bind(millis(retention))
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }
}

/// A batch in the order its statement must lock its rows: by lease id. Heartbeat and settle batches (Complete, the
/// reaper, released deliveries) lock one leased row after another in input order, so sorting them alike means two
/// batches never wait for each other in a cycle; a deadlock would stall both for `deadlock_timeout` (1 s) before
/// Postgres broke it.
fn in_lock_order<T>(batch: &[T], lease_id: impl Fn(&T) -> Uuid) -> Vec<&T> {
    let mut sorted: Vec<&T> = batch.iter().collect();
    sorted.sort_by_key(|item| lease_id(item));
    sorted
}

/// Where a fenced batch statement writes the rows its `FOR UPDATE` locked.
#[derive(Debug, Clone, Copy)]
enum Found {
    /// At the address (`ctid`) the lock returned: a TID scan, no second index lookup per row.
    AtAddress,
    /// By primary key: an index lookup, after which Postgres re-checks the newest version of a changed row.
    ByKey,
}

/// Runs a fenced batch statement over `items` [`in_lock_order`] with its writes [`Found::AtAddress`], then once
/// more [`Found::ByKey`] for the items the first run left out (still in lock order). A statement reads one
/// snapshot; a row changed by a transaction that committed after it was taken (a heartbeat, a cancel request, a
/// closing stream shortening its leases) is locked in its newest version, whose address that snapshot cannot see,
/// so the first run skips it although its lease held. Items left out twice are not current. The second run costs a
/// statement only when something was left out.
async fn at_address_then_by_key<'a, T, A, F, Fut>(
    items: &'a [T],
    item_lease: impl Fn(&T) -> Uuid,
    answer_lease: impl Fn(&A) -> Uuid,
    run: F,
) -> Result<Vec<A>>
where
    F: Fn(Found, Vec<&'a T>) -> Fut,
    Fut: Future<Output = Result<Vec<A>>>,
{
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let items = in_lock_order(items, &item_lease);
    let mut answers = run(Found::AtAddress, items.clone()).await?;
    if answers.len() < items.len() {
        let answered: HashSet<Uuid> = answers.iter().map(&answer_lease).collect();
        let missed: Vec<&T> = items.into_iter().filter(|item| !answered.contains(&item_lease(item))).collect();
        answers.extend(run(Found::ByKey, missed).await?);
    }
    Ok(answers)
}

/// Inserts the jobs and sends one NOTIFY (none for `None`), in one statement. A job with a `lease_to` slot is
/// inserted LEASED to it, as a claim would have leased it, unless its queue is paused; those jobs are returned.
async fn insert_and_notify<'e>(
    executor: impl PgExecutor<'e>,
    jobs: &[NewJob],
    notify: Option<&str>,
) -> Result<Vec<Job>> {
    // Ids and payloads differ per job; every other column is usually shared by the whole batch (one producer's
    // jobs), so it is bound once (see `bind_column`) and the statement reads `COALESCE(element, shared value)`.
    let query = sqlx::query(concat!(
        "WITH new AS ( \
           SELECT id, COALESCE(queue, $4) AS queue, COALESCE(kind, $6) AS kind, payload, \
             COALESCE(priority, $8) AS priority, COALESCE(run_at, $10, now()) AS run_at, \
             COALESCE(max_attempts, $12) AS max_attempts, COALESCE(lease_ttl_ms, $14) AS lease_ttl_ms, \
             COALESCE(execution_timeout_ms, $16) AS execution_timeout_ms, \
             COALESCE(idempotency_key, $18) AS idempotency_key, COALESCE(initial_backoff_ms, $20) AS initial_backoff_ms, \
             COALESCE(max_backoff_ms, $22) AS max_backoff_ms, COALESCE(backoff_multiplier, $24) AS backoff_multiplier, \
             COALESCE(metadata, $26) AS metadata, now() AS created_at, COALESCE(traceparent, $28) AS traceparent, \
             COALESCE(tracestate, $30) AS tracestate, COALESCE(session_id, $32) AS session_id, \
             COALESCE(worker_id, $34) AS worker_id \
           FROM unnest($1::uuid[], $2::bytea[], $3::text[], $5::text[], $7::int[], $9::timestamptz[], $11::int[], \
             $13::bigint[], $15::bigint[], $17::text[], $19::bigint[], $21::bigint[], $23::float8[], $25::jsonb[], \
             $27::text[], $29::text[], $31::uuid[], $33::text[]) \
           AS t(id, payload, queue, kind, priority, run_at, max_attempts, lease_ttl_ms, execution_timeout_ms, \
             idempotency_key, initial_backoff_ms, max_backoff_ms, backoff_multiplier, metadata, traceparent, \
             tracestate, session_id, worker_id)), \
         leasing AS ( \
           SELECT new.*, new.session_id IS NOT NULL AND paused.name IS NULL AS lease \
           FROM new LEFT JOIN queues paused ON paused.name = new.queue AND paused.paused), \
         inserted AS ( \
           INSERT INTO jobs (",
        spec_columns!(),
        ", state, attempt, lease_id, leased_at, session_id, worker_id, \
             attempt_deadline, lease_expires_at) \
           SELECT ",
        spec_columns!(),
        ", CASE WHEN lease THEN 'leased' ELSE 'queued' END, lease::int, \
             CASE WHEN lease THEN gen_random_uuid() END, CASE WHEN lease THEN clock_timestamp() END, \
             CASE WHEN lease THEN session_id END, CASE WHEN lease THEN worker_id END, \
             CASE WHEN lease THEN clock_timestamp() + execution_timeout_ms * interval '1 millisecond' END, \
             CASE WHEN lease THEN LEAST(clock_timestamp() + lease_ttl_ms * interval '1 millisecond', \
               clock_timestamp() + execution_timeout_ms * interval '1 millisecond') END \
           FROM leasing \
           RETURNING id, state, created_at, run_at, lease_id, leased_at, lease_expires_at) \
         SELECT $36::text IS NULL OR pg_notify($35, $36) IS NULL AS notified, inserted.* \
         FROM (VALUES (true)) AS one LEFT JOIN inserted ON inserted.state = 'leased'"
    ))
    .bind(jobs.iter().map(|j| j.id).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.spec.payload.as_slice()).collect::<Vec<_>>());
    let query = bind_column(query, jobs.iter().map(|j| j.spec.queue.as_str()));
    let query = bind_column(query, jobs.iter().map(|j| j.spec.kind.as_str()));
    let query = bind_column(query, jobs.iter().map(|j| j.spec.priority));
    let query = bind_column(query, jobs.iter().map(|j| j.run_at));
    let query = bind_column(query, jobs.iter().map(|j| j.spec.max_attempts as i32));
    let query = bind_column(query, jobs.iter().map(|j| millis(j.spec.lease_ttl)));
    let query = bind_column(query, jobs.iter().map(|j| j.spec.execution_timeout.map(millis)));
    let query = bind_column(query, jobs.iter().map(|j| j.spec.idempotency_key.as_deref()));
    let query = bind_column(query, jobs.iter().map(|j| millis(j.spec.retry.initial)));
    let query = bind_column(query, jobs.iter().map(|j| millis(j.spec.retry.max)));
    let query = bind_column(query, jobs.iter().map(|j| j.spec.retry.multiplier));
    let query = bind_column(query, jobs.iter().map(|j| Json(&j.spec.metadata)));
    let query = bind_column(query, jobs.iter().map(|j| j.trace.as_ref().map(|t| t.traceparent.as_str())));
    let query = bind_column(query, jobs.iter().map(|j| j.trace.as_ref().and_then(|t| t.tracestate.as_deref())));
    let query = bind_column(query, jobs.iter().map(|j| j.lease_to.as_ref().map(|slot| slot.session_id)));
    let query = bind_column(query, jobs.iter().map(|j| j.lease_to.as_ref().map(|slot| slot.worker_id.as_str())));
    let rows = query.bind(super::ENQUEUED_CHANNEL).bind(notify).fetch_all(executor).await?;
    let offered: HashMap<Uuid, &NewJob> =
        jobs.iter().filter(|job| job.lease_to.is_some()).map(|job| (job.id, job)).collect();
    let mut leased = Vec::new();
    for row in &rows {
        if let Some(id) = row.try_get::<Option<Uuid>, _>("id")? {
            let new = offered.get(&id).ok_or_else(|| {
                sqlx::Error::Protocol(format!("the insert leased job {id}, which had no slot to go to"))
            })?;
            leased.push(rows::leased_at_insert(row, new)?);
        }
    }
    Ok(leased)
}

/// Binds one column of a multi-row insert as two parameters: the array of every row's value and `NULL`, or, when
/// all rows share one value, an empty array and that value, so Postgres decodes it once instead of once per row
/// (`unnest` pads the empty array with NULLs, which `COALESCE` replaces by the shared value; a shared NULL stays
/// NULL).
fn bind_column<'q, T>(query: PgQuery<'q>, values: impl Iterator<Item = T>) -> PgQuery<'q>
where
    T: 'q + PartialEq + Encode<'q, Postgres> + Type<Postgres>,
    Vec<T>: Encode<'q, Postgres> + Type<Postgres>,
{
    let mut each: Vec<T> = values.collect();
    if each.windows(2).all(|pair| pair[0] == pair[1]) {
        let shared = each.pop();
        each.clear();
        query.bind(each).bind(shared)
    } else {
        query.bind(each).bind(None::<T>)
    }
}
