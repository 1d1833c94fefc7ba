//! Read-only figures for monitoring: live jobs per queue and state, and the connection pool's use.
//!
//! Read when metrics are scraped, never on a hot path. Finished jobs are not counted (that history is what the
//! completion counters are for), so the statement's cost follows the backlog, not the retention.

use super::{Store, rows::live_depths};
use crate::error::Result;

/// Live jobs of one queue, by the database clock.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueueDepth {
    pub queue: String,
    /// QUEUED and due.
    pub queued: i64,
    /// QUEUED with `run_at` in the future.
    pub scheduled: i64,
    pub leased: i64,
    /// Seconds the oldest due QUEUED job has waited since its `run_at`; 0 when none is due.
    pub oldest_queued_age: f64,
}

/// The connection pool right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    pub idle: u32,
    pub in_use: u32,
    pub max: u32,
}

impl Store {
    /// Every queue with live jobs, in one pass over `jobs`.
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        let depths = sqlx::query_as(concat!(
            "WITH live AS (",
            live_depths!(),
            " GROUP BY queue) \
             SELECT queue, queued, scheduled, leased, \
               COALESCE(extract(epoch FROM clock_timestamp() - oldest), 0)::float8 AS oldest_queued_age \
             FROM live ORDER BY queue"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(depths)
    }

    /// Open connections, idle and in use, and the most the pools open (the claims' included).
    pub fn pool_use(&self) -> PoolUse {
        let (open, idle) =
            (self.pool.size() + self.claims.size(), (self.pool.num_idle() + self.claims.num_idle()) as u32);
        let max = self.pool.options().get_max_connections() + self.claims.options().get_max_connections();
        PoolUse { idle, in_use: open.saturating_sub(idle), max }
    }
}
