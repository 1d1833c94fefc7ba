//! The harness of the broker's integration tests: a fresh database per test, a broker served in-process on port 0,
//! a private Postgres for tests that stop it, and waiting for a condition with a deadline.
//!
//! Test databases live on one shared server: `$DATABASE_URL` if set, else a non-durable cluster in a scratch
//! directory on port 54331 (`$JOBBROKER_TEST_PG_PORT`), started by the first test process that needs it and
//! reused by every later one (see `broker::devdb`). This module asserts nothing about the broker and holds no
//! fixtures: each test says what it checks.

#![allow(dead_code)] // every test binary compiles this module and uses a different part of it

pub mod polyglot;
pub mod tls;
pub mod worker;

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::Once,
    time::{Duration, Instant},
};

use broker::{
    config::{MetricsListen, Settings},
    devdb::{self, LocalPostgres, PgOptions},
};
use jobbroker::v1::broker_service_client::BrokerServiceClient;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::{net::TcpListener, sync::OnceCell, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// Port of the shared test cluster unless `JOBBROKER_TEST_PG_PORT` says otherwise (not 5432: leave that alone).
const TEST_PG_PORT: u16 = 54331;
/// How often [`wait_for`] asks again.
const POLL: Duration = Duration::from_millis(20);

/// URL of the shared server's `postgres` database, once this process has reached it.
static SERVER: OnceCell<String> = OnceCell::const_new();

/// The URL of a new, empty database, for this test alone, on the shared test server.
pub async fn test_database() -> String {
    init_tracing();
    let server = SERVER.get_or_init(shared_server).await;
    // The pid lets a later process drop the databases of processes that have exited.
    let name = format!("t_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let mut conn = connect(server).await;
    let create = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await;
    create.unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let _ = conn.close().await;
    let mut url = url::Url::parse(server).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// A Postgres of its own for a test that stops, restarts or crashes it: a fresh directory and a free port, stopped
/// and deleted when dropped. Not durable against machine crashes, but acknowledged commits survive
/// `stop_immediate`. Blocks for a second or two while `initdb` runs.
pub fn private_postgres(name: &str) -> LocalPostgres {
    init_tracing();
    LocalPostgres::temporary(name, &PgOptions::fast())
        .unwrap_or_else(|e| panic!("starting a private Postgres for {name}: {e:#}"))
}

/// Calls `check` every 20 ms until it returns `Some`, and returns that; panics naming `what` after `timeout`.
/// Use it instead of sleeping: it returns as soon as the condition holds.
pub async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    // Real time, so a test that pauses tokio's clock cannot time out early.
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(value)) = tokio::time::timeout(left, check()).await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (default `warn`). Safe to call many times.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A broker served in-process by `broker::serve` on 127.0.0.1 and a port the OS chose.
pub struct TestBroker {
    pub addr: SocketAddr,
    /// The plaintext health-only port, when started with [`TestBroker::start_with_health_port`].
    pub health_addr: Option<SocketAddr>,
    /// `http://{addr}`, for clients.
    pub url: String,
    /// `http://127.0.0.1:{port}/metrics`: the broker's Prometheus endpoint, on a port of its own.
    pub metrics_url: String,
    /// Sending on it, or dropping it, begins the broker's graceful shutdown.
    shutdown: Option<oneshot::Sender<()>>,
    /// The serving task; yields what `broker::serve` returned.
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// How long [`TestBroker::stop`] waits: the broker's shutdown grace and some slack.
    stop_timeout: Duration,
}

impl TestBroker {
    /// Serves `settings` (its `listen` and `metrics` are replaced by addresses bound here) until stopped or dropped.
    pub async fn start(settings: Settings) -> TestBroker {
        TestBroker::start_on(settings, SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Like [`TestBroker::start`], plus a plaintext health-only port (`--health-listen`) on another free port.
    pub async fn start_with_health_port(settings: Settings) -> TestBroker {
        let health = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await.expect("a free port");
        let grpc = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await.expect("a free port");
        TestBroker::launch(settings, grpc, Some(health))
    }

    /// Like [`TestBroker::start`] but on `addr`: pass an earlier broker's `addr` to restart "the same" broker
    /// where its clients reconnect. Retries the bind for a few seconds while the port is still being released.
    pub async fn start_on(settings: Settings, addr: SocketAddr) -> TestBroker {
        let listener = wait_for(&format!("binding {addr}"), Duration::from_secs(5), || async move {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        TestBroker::launch(settings, listener, None)
    }

    fn launch(mut settings: Settings, listener: TcpListener, health: Option<TcpListener>) -> TestBroker {
        init_tracing();
        let addr = listener.local_addr().expect("the bound address");
        let health_addr = health.as_ref().map(|health| health.local_addr().expect("the bound address"));
        settings.listen = addr;
        let metrics = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("a metrics port");
        let metrics_url = format!("http://{}/metrics", metrics.local_addr().expect("the bound address"));
        settings.metrics = MetricsListen::Bound(metrics.into());
        let stop_timeout = settings.shutdown_grace + Duration::from_secs(10);
        let (shutdown, shutdown_requested) = oneshot::channel::<()>();
        let shutdown_requested = async move {
            // Err means the sender was dropped with the TestBroker: shut down then too.
            let _ = shutdown_requested.await;
        };
        let handle = tokio::spawn(async move {
            let listeners = broker::Listeners { grpc: listener, health };
            let result = broker::serve(listeners, settings, shutdown_requested).await;
            if let Err(error) = &result {
                tracing::error!(%addr, error = format!("{error:#}"), "test broker failed");
            }
            result
        });
        TestBroker {
            addr,
            health_addr,
            url: format!("http://{addr}"),
            metrics_url,
            shutdown: Some(shutdown),
            handle: Some(handle),
            stop_timeout,
        }
    }

    /// A `BrokerService` client connected with `jobbroker::client::connect`, as users connect.
    pub async fn client(&self) -> BrokerServiceClient<Channel> {
        wait_for("a client connection to the test broker", Duration::from_secs(10), || async move {
            assert!(!self.has_exited(), "the test broker at {} exited (its error is logged above)", self.addr);
            jobbroker::client::connect(self.url.clone()).await.ok()
        })
        .await
    }

    /// A plain channel to the broker, for the other services (admin, health, reflection).
    pub async fn channel(&self) -> Channel {
        let endpoint = &Endpoint::from_shared(self.url.clone()).expect("a valid URL");
        wait_for("a channel to the test broker", Duration::from_secs(10), || async move {
            assert!(!self.has_exited(), "the test broker at {} exited (its error is logged above)", self.addr);
            endpoint.connect().await.ok()
        })
        .await
    }

    /// Whether `broker::serve` has returned (after a shutdown, or because it failed).
    pub fn has_exited(&self) -> bool {
        self.handle.as_ref().is_none_or(|handle| handle.is_finished())
    }

    /// Shuts the broker down gracefully and waits for it; panics if it fails or takes too long.
    pub async fn stop(self) {
        let addr = self.addr;
        if let Err(error) = self.try_stop().await {
            panic!("the test broker at {addr} did not stop cleanly: {error:#}");
        }
    }

    /// Shuts the broker down gracefully and returns what `broker::serve` returned.
    pub async fn try_stop(mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let Some(handle) = self.handle.take() else { return Ok(()) };
        match tokio::time::timeout(self.stop_timeout, handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(join_error)) => Err(anyhow::anyhow!("the serving task died: {join_error}")),
            Err(_) => Err(anyhow::anyhow!("serve did not return within {:?} of the shutdown", self.stop_timeout)),
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The shared server's URL: `$DATABASE_URL`, or the shared test cluster, started if it is not running.
async fn shared_server() -> String {
    if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty()) {
        return url;
    }
    let port = match std::env::var("JOBBROKER_TEST_PG_PORT") {
        Ok(port) => port.parse().expect("JOBBROKER_TEST_PG_PORT is a port number"),
        Err(_) => TEST_PG_PORT,
    };
    let dir = devdb::scratch_dir("test-postgres");
    let start = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, port, &PgOptions::fast()));
    let pg = start.await.expect("the start task ran").unwrap_or_else(|e| {
        panic!(
            "starting the shared test Postgres on port {port} (set JOBBROKER_TEST_PG_PORT to move it, or \
             DATABASE_URL to use a server of your own): {e:#}"
        )
    });
    // Dropping `pg` leaves the server running for the next test process.
    drop_leftover_databases(&pg.url()).await;
    pg.url()
}

/// Drops the test databases of test processes that have exited, so the shared cluster does not grow run after run.
/// Only for our own cluster, and only where `/proc` tells which processes live.
async fn drop_leftover_databases(server: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let mut conn = connect(server).await;
    let names = sqlx::query_scalar::<_, String>(r"SELECT datname FROM pg_database WHERE datname LIKE 't\_%'")
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
    for name in names {
        let pid = name.split('_').nth(1).and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        let drop = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).execute(&mut conn).await;
        if let Err(error) = drop {
            tracing::debug!(%error, name, "left a test database in place");
        }
    }
    let _ = conn.close().await;
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap_or_else(|e| panic!("connecting to the test Postgres server: {e}"))
}
