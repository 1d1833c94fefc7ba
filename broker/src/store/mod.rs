//! The job store: every SQL statement the broker runs, and nothing else.
//!
//! Each statement is a named method on [`Store`]; fencing is always a conditional write whose returned rows say
//! whether the lease held. Hot statements (claim, heartbeat, settle, insert) take whole batches as arrays.
//! The store decides nothing: retry policy, dispatch and idempotency resolution live in `domain`.

mod admin;
mod jobs;

pub use admin::SessionRecord;
pub use jobs::{Bound, Claimed, Inserted, KeyHolder, NewKey};
pub use stats::{PoolUse, QueueDepth};
mod rows;
mod stats;

use std::{str::FromStr as _, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};

use crate::{config::Settings, error::Result};

/// NOTIFY channel carrying the queues where jobs became due: an enqueue batch's, or re-queued leases'
/// (comma-separated, or `*`), after the replica that sent it.
pub const ENQUEUED_CHANNEL: &str = "jobbroker_enqueued";
/// NOTIFY channel carrying the lease id of a job whose cancel was requested while leased.
pub const CANCEL_CHANNEL: &str = "jobbroker_cancel";
/// NOTIFY channel carrying the ids of leases completed through a replica whose streams do not hold them
/// (comma-separated): the holder's replica frees their slots.
pub const SETTLED_CHANNEL: &str = "jobbroker_settled";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handle to the Postgres job store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// A few connections for claims, which commit with `synchronous_commit = off`: a claim does not wait for its
    /// WAL flush, so a waiting worker gets its job one disk flush sooner. A claim lost in a Postgres crash only
    /// leaves its job QUEUED to be leased again (the worker's completion is then refused: at-least-once, as for any
    /// crash); every acknowledged enqueue and completion still waits for the flush, which also makes the claims
    /// before it durable.
    claims: PgPool,
}

/// What share of `--db-pool-size` claims get (at least one connection).
const CLAIM_POOL_SHARE: u32 = 8;

/// The broker's subscription to cross-replica notifications.
pub struct Notifications {
    listener: PgListener,
}

/// One notification from another replica (or this one).
pub struct Notification {
    pub channel: String,
    pub payload: String,
}

impl Store {
    /// A pool that connects on demand, so the broker starts (NOT_SERVING) while Postgres is down. Every
    /// connection runs with `statement_timeout`, so no statement holds a connection (and its locks) for long, and
    /// with `random_page_cost = 1.1` (the usual value for SSDs): with the default 4 the planner may claim from a
    /// freshly loaded or just-analyzed backlog by reading and sorting the whole queue instead of walking the claim
    /// index, which costs seconds per claim at a million queued jobs.
    pub fn connect_lazy(settings: &Settings) -> Result<Store> {
        let options = PgConnectOptions::from_str(&settings.database_url)?.options([
            ("statement_timeout", format!("{}ms", millis(settings.statement_timeout))),
            ("random_page_cost", "1.1".to_owned()),
        ]);
        let claim_connections = (settings.db_pool_size / CLAIM_POOL_SHARE).max(1);
        let pool = |size: u32, options: PgConnectOptions| {
            PgPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(settings.db_acquire_timeout)
                .connect_lazy_with(options)
        };
        let claims = pool(claim_connections, options.clone().options([("synchronous_commit", "off")]));
        Ok(Store { pool: pool(settings.db_pool_size - claim_connections, options), claims })
    }

    /// Applies pending migrations under sqlx's advisory lock, so replicas starting together are safe.
    /// Migrations may rightly outlast `statement_timeout` (an index on a big table): they run on a connection
    /// of their own without it (a later `-c` option wins).
    pub async fn migrate(&self) -> Result<()> {
        let options = (*self.pool.connect_options()).clone().options([("statement_timeout", "0")]);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.pool.options().get_acquire_timeout())
            .connect_lazy_with(options);
        let migrated = MIGRATOR.run(&pool).await;
        pool.close().await;
        migrated.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => e.into(),
            other => crate::error::Error::Internal(other.to_string()),
        })
    }

    /// Cheapest round trip: is the database answering?
    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        match tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await {
            Ok(done) => done.map(|_| ()).map_err(Into::into),
            Err(_) => Err(crate::error::Error::Unavailable("the job store did not answer in time".into())),
        }
    }

    /// Subscribes to the enqueue, cancel and settled channels on a dedicated connection.
    pub async fn listen(&self) -> Result<Notifications> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen_all([ENQUEUED_CHANNEL, CANCEL_CHANNEL, SETTLED_CHANNEL]).await?;
        Ok(Notifications { listener })
    }

    /// Sends every one of `notes` on `channel`, in one statement.
    pub async fn notify(&self, channel: &str, notes: &[String]) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, note) FROM unnest($2::text[]) note")
            .bind(channel)
            .bind(notes)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.claims.close().await;
        self.pool.close().await;
    }
}

impl Notifications {
    /// The next notification; an error means the connection was lost (the caller re-subscribes).
    pub async fn recv(&mut self) -> Result<Notification> {
        let note = self.listener.recv().await?;
        Ok(Notification { channel: note.channel().to_owned(), payload: note.payload().to_owned() })
    }
}

/// How often a batch statement runs again after Postgres chose it as a deadlock victim.
const DEADLOCK_RETRIES: usize = 5;

/// Runs `statement` again when Postgres aborted it to break a deadlock (SQLSTATE 40P01). The hot batch statements
/// (heartbeat, settle) lock many job rows in whatever order their plans visit them, so two of them can deadlock;
/// the victim's transaction changed nothing, so running it again is safe, and its callers never see the deadlock.
async fn retry_deadlocks<T, F, Fut>(mut statement: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut retries = 0;
    loop {
        match statement().await {
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some("40P01") && retries < DEADLOCK_RETRIES =>
            {
                retries += 1;
                tracing::debug!(retries, "batch statement chosen as a deadlock victim; running it again");
            }
            done => return done,
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
