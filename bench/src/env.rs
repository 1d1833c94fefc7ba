//! One scenario's surroundings: a fresh database on the shared Postgres, and a broker serving it as a child
//! process on a free port.
//!
//! The broker runs as its own process (this very executable, re-run as `bench broker …`, which calls the same
//! `broker::run` as the `broker` binary's `main`), so its resident memory and CPU time can be read from `/proc`
//! apart from the load generator's, and nothing the bench does (4 000 in-flight futures, 5 000 client streams)
//! lands in the broker's address space. A fresh database and broker per scenario keep scenarios independent:
//! no backlog, bloat or memory is inherited from the one before.

use std::{process::Stdio, time::Duration};

use anyhow::Context as _;
use broker::devdb::{self, LocalPostgres, PgOptions};
use jobbroker::v1::broker_service_client::BrokerServiceClient;
use sqlx::{AssertSqlSafe, PgPool, postgres::PgPoolOptions};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::usage::{self, Proc};

pub type Client = BrokerServiceClient<Channel>;

/// Port of the bench's own Postgres (kept running between runs, data under the scratch directory). Below Linux's
/// ephemeral range (32768–60999): `.ci/run` starts this server right after the test suite, whose many connections
/// to the test Postgres hold ports of that range, and one held 54340 once (the server could not bind).
const PG_PORT: u16 = 25340;

/// `DATABASE_URL`, or a durable private Postgres started (or reused) in a scratch directory.
pub async fn postgres() -> anyhow::Result<(String, Option<LocalPostgres>)> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok((url, None));
    }
    let postgres = tokio::task::spawn_blocking(|| {
        LocalPostgres::start(&devdb::scratch_dir("bench-postgres"), PG_PORT, &PgOptions::default())
    })
    .await??;
    Ok((postgres.url(), Some(postgres)))
}

/// A fresh database and a broker serving it.
pub struct Env {
    /// `http://127.0.0.1:PORT` of the broker.
    pub address: String,
    /// The scenario's database, for reading what the broker recorded.
    pub pool: PgPool,
    broker: Child,
    /// The Postgres server process, when it runs on this machine (for its CPU time).
    pub postmaster: Option<u32>,
    server_url: String,
    database: String,
}

impl Env {
    /// Creates database `bench_{name}_{pid}` and starts a broker on it with the extra `flags`.
    pub async fn start(server_url: &str, name: &str, flags: &[String]) -> anyhow::Result<Env> {
        // Only letters, digits and underscores: safe to splice into the statements below.
        let database = format!("bench_{name}_{}", std::process::id());
        let admin = PgPoolOptions::new().max_connections(1).connect(server_url).await.context("connecting")?;
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database}"))).execute(&admin).await?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&admin).await?;
        admin.close().await;
        let base = server_url.rsplit_once('/').map_or(server_url, |(base, _)| base);
        let url = format!("{base}/{database}");
        let pool = PgPoolOptions::new().max_connections(16).connect(&url).await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await?;
        let postmaster = u32::try_from(backend).ok().and_then(usage::parent_of);

        let port = devdb::free_port()?;
        let broker = Command::new(std::env::current_exe()?)
            .arg("broker")
            .args(["--database-url", &url, "--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .env("RUST_LOG", std::env::var("BENCH_BROKER_LOG").unwrap_or_else(|_| "warn".into()))
            // Once the broker serves metrics, a fixed metrics port would collide with anything else on it.
            .env("JOBBROKER_METRICS_LISTEN", "off")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the broker")?;
        let mut env = Env {
            address: format!("http://127.0.0.1:{port}"),
            pool,
            broker,
            postmaster,
            server_url: server_url.to_owned(),
            database,
        };
        env.wait_serving().await?;
        // For attaching a profiler (`perf record -p PID`) to the broker of one scenario.
        eprintln!("bench: {name}: broker pid {} serving {}", env.broker()?.0, env.address);
        Ok(env)
    }

    /// Waits until the broker has migrated and its health says SERVING.
    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.broker.try_wait()? {
                anyhow::bail!("the broker exited at start-up with {status}");
            }
            if let Ok(channel) = Channel::from_shared(self.address.clone())?.connect().await {
                let asked = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
                if asked.is_ok_and(|answer| answer.into_inner().status() == ServingStatus::Serving) {
                    return Ok(());
                }
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the broker did not serve within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn broker(&self) -> anyhow::Result<Proc> {
        self.broker.id().map(Proc).context("the broker has exited")
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(jobbroker::client::connect(self.address.clone()).await?)
    }

    /// Stops the broker (SIGTERM, it must exit 0) and drops the database.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        let status = usage::terminate(&mut self.broker, Duration::from_secs(30)).await?;
        anyhow::ensure!(status.success(), "the broker exited with {status} after SIGTERM");
        self.pool.close().await;
        let admin = PgPoolOptions::new().max_connections(1).connect(&self.server_url).await?;
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", self.database))).execute(&admin).await?;
        Ok(())
    }
}
