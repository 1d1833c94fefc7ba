//! The harness of jobctl's tests: a broker served in-process on a fresh database, the real `jobctl` binary run
//! against it, an in-process worker, and waiting for a condition with a deadline.
//!
//! The database is a new one on the shared test Postgres that the broker's own tests use (`broker::devdb`, port
//! 54331 or `$JOBBROKER_TEST_PG_PORT`), named `t_<pid>_…` like theirs so that their clean-up drops it once this
//! process has exited. Deliberately small: it asserts nothing and holds no fixtures.

#![allow(dead_code)] // each test binary uses a different part

pub mod buf;

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    process::Output,
    time::{Duration, Instant},
};

use broker::{
    config::Settings,
    devdb::{self, LocalPostgres, PgOptions},
};
use jobbroker::worker::{self, ActiveJob, Control, Outcome, WorkerOptions};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

const TEST_PG_PORT: u16 = 54331;

/// A broker on 127.0.0.1 and a port the OS chose, with a database of its own; shut down when dropped.
pub struct TestBroker {
    /// `http://127.0.0.1:PORT`, what `--addr` takes.
    pub url: String,
    /// `127.0.0.1:PORT`, what grpcurl takes.
    pub addr: SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let settings = Settings::with_database(fresh_database().await);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("binding a port for the broker");
        let addr = listener.local_addr().expect("the bound address");
        let (shutdown, shutdown_requested) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = broker::serve(listener, settings, async move {
                let _ = shutdown_requested.await;
            });
            if let Err(error) = serve.await {
                panic!("the test broker at {addr} failed: {error:#}");
            }
        });
        TestBroker { url: format!("http://{addr}"), addr, _shutdown: shutdown }
    }

    /// Waits until the broker reports SERVING (it starts NOT_SERVING until it has reached its database), and returns
    /// what `jobctl health` printed then.
    pub async fn ready(&self) -> String {
        wait_for("the broker to report SERVING", Duration::from_secs(20), || async {
            let run = self.jobctl(&["health"]).await;
            run.output.status.success().then(|| run.stdout())
        })
        .await
    }

    /// Runs `jobctl ARGS…` to completion, pointed at this broker by `JOBBROKER_ADDR`.
    pub async fn jobctl(&self, args: &[impl AsRef<std::ffi::OsStr>]) -> Run {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobctl"))
            .args(args)
            .env("JOBBROKER_ADDR", &self.url)
            .env_remove("JOBBROKER_TOKEN")
            .output()
            .await
            .expect("running jobctl");
        let args = args.iter().map(|arg| arg.as_ref().to_string_lossy()).collect::<Vec<_>>().join(" ");
        Run { args, output }
    }

    /// A worker on `queues` that succeeds with the payload upper-cased, or fails for good when the payload starts
    /// with `fail`.
    pub fn worker(&self, worker_id: &str, queues: &[&str]) -> TestWorker {
        let mut options = WorkerOptions::new([self.url.clone()], queues.iter().copied(), 4);
        options.worker_id = worker_id.to_owned();
        options.labels.insert("team".into(), "ops".into());
        let handler = |job: ActiveJob| async move {
            match job.payload().starts_with(b"fail") {
                true => Outcome::Failure { message: "told to fail".into(), non_retryable: true, retry_after: None },
                false => Outcome::Success(job.payload().to_ascii_uppercase()),
            }
        };
        let control = Control::default();
        let task = tokio::spawn(worker::run(options, handler, control.clone()));
        TestWorker { control, task }
    }
}

/// A worker running in this process; aborted when stopped or dropped.
pub struct TestWorker {
    control: Control,
    task: JoinHandle<Result<(), tonic::Status>>,
}

impl TestWorker {
    /// Stops at once (running jobs are released) and waits until the stream is closed.
    pub async fn stop(mut self) {
        self.control.abort.cancel();
        let result = (&mut self.task).await.expect("the worker task ran");
        result.expect("the worker stopped cleanly");
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.control.abort.cancel();
    }
}

/// What one jobctl run printed and how it exited.
pub struct Run {
    args: String,
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// Stdout, after asserting the run succeeded.
    pub fn ok(&self) -> String {
        assert!(self.output.status.success(), "jobctl {} failed: {}{}", self.args, self.stderr(), self.stdout());
        self.stdout()
    }

    /// Stdout parsed as one JSON document, after asserting the run succeeded.
    pub fn json(&self) -> serde_json::Value {
        let stdout = self.ok();
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("jobctl {} printed no JSON ({e}): {stdout}", self.args))
    }

    /// Stderr, after asserting the run failed with `code`.
    pub fn fails_with(&self, code: i32) -> String {
        assert_eq!(self.code(), Some(code), "jobctl {}: {}{}", self.args, self.stderr(), self.stdout());
        self.stderr()
    }
}

/// Calls `check` until it returns `Some`, and returns that; panics naming `what` after `timeout`.
pub async fn wait_for<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The URL of a new, empty database on the shared test Postgres, started if it is not running.
async fn fresh_database() -> String {
    let port = std::env::var("JOBBROKER_TEST_PG_PORT").map_or(TEST_PG_PORT, |p| p.parse().expect("a port number"));
    let dir = devdb::scratch_dir("test-postgres");
    let start = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, port, &PgOptions::fast()));
    let server = start.await.expect("the start task ran").expect("starting the shared test Postgres");
    let name = format!("t_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&server.url()).await.expect("connecting to the test Postgres");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.expect("CREATE DATABASE");
    server.url_for(&name)
}
