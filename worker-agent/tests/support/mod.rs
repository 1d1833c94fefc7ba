//! Shared support for the worker-agent's integration tests: the broker's test harness (re-exported), the real
//! `worker-agent` binary as a child process, waiting for a job through `GetJob`, and a scripted HTTP server.
//!
//! A test file starts with `mod support;` and `use support::*;`, starts a broker with [`start_broker`] (fast
//! timings) or `TestBroker::start(settings)`, runs agents with [`spawn_agent`], and watches jobs with
//! [`wait_for_state`] / [`wait_for_job`]. Like the broker's harness, this module asserts nothing about the agent.
//!
//! On a failing test, every [`Agent`] still alive prints its log (stdout and stderr) when dropped, and kills the
//! processes it started (its job processes) so nothing outlives the test.

#![allow(dead_code)] // every test binary compiles this module and uses a different part of it

#[path = "../../../broker/tests/common/mod.rs"]
pub mod common;

use std::{
    collections::VecDeque,
    convert::Infallible,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

#[allow(unused_imports)] // re-exported for the test files; each uses a different part
pub use broker::config::Settings;
#[allow(unused_imports)]
pub use common::{
    TestBroker, test_database, wait_for,
    worker::{duration, enqueue, get_job},
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use tokio::{net::TcpListener, process::Child, task::JoinSet};
use tonic::transport::Channel;

/// How often the job helpers ask `GetJob` again.
const POLL: Duration = Duration::from_millis(20);

/// Broker settings for agent tests on `database_url`: lease TTL 2 s (the agent heartbeats every ~0.7 s),
/// reconnect grace 1 s, reaper every 100 ms, retry backoff 100 ms..1 s, shutdown grace 2 s.
pub fn fast_settings(database_url: String) -> Settings {
    let mut settings = Settings::with_database(database_url);
    settings.defaults.lease_ttl = Duration::from_secs(2);
    settings.defaults.initial_backoff = Duration::from_millis(100);
    settings.defaults.max_backoff = Duration::from_secs(1);
    settings.reconnect_grace = Duration::from_secs(1);
    settings.reaper_interval = Duration::from_millis(100);
    settings.shutdown_grace = Duration::from_secs(2);
    settings
}

/// A broker on a fresh test database with [`fast_settings`].
pub async fn start_broker() -> TestBroker {
    TestBroker::start(fast_settings(test_database().await)).await
}

/// A running `worker-agent` process (the real binary), or another worker process started with [`spawn_process`].
/// Dropping it kills it and the processes it started.
pub struct Agent {
    child: Child,
    pid: u32,
    /// What it is called in panic messages and printed logs (`worker-agent`, `python worker.py`).
    name: String,
    /// Where the agent's stdout and stderr go; printed if the test panics while the agent is alive.
    log: tempfile::NamedTempFile,
    /// Processes started under the agent, noted each time it was signalled (a killed agent's job processes are
    /// re-parented and cannot be found from it any more); killed on drop.
    strays: Vec<Proc>,
}

/// Starts `worker-agent --broker <broker_url> <args…>` with `envs` added to its environment. The agent does not
/// inherit any `JOBBROKER_*` variable from the test process, and logs at `RUST_LOG=info` without colours
/// (`NO_COLOR=1`) unless `envs` says otherwise.
/// Example: `spawn_agent(&broker.url, &["--queue", "q", "--exec", "cat"], &[])`.
pub fn spawn_agent(broker_url: &str, args: &[&str], envs: &[(&str, &str)]) -> Agent {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker-agent"));
    command.arg("--broker").arg(broker_url).args(args);
    command.env("RUST_LOG", "info").env("NO_COLOR", "1").envs(envs.iter().copied());
    spawn_process("worker-agent", command)
}

/// Starts `command` (any worker: the agent, a Python or Node worker) as an [`Agent`] called `name`, with stdin
/// closed, stdout and stderr in its log, and no `JOBBROKER_*` variable inherited from the test process.
pub fn spawn_process(name: &str, mut command: tokio::process::Command) -> Agent {
    let log = tempfile::Builder::new().prefix("worker-").suffix(".log").tempfile().expect("a log file");
    let stderr = log.reopen().expect("reopening the log file");
    let stdout = stderr.try_clone().expect("cloning the log file handle");
    let explicit: Vec<_> = command.as_std().get_envs().map(|(variable, _)| variable.to_owned()).collect();
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("JOBBROKER_") && !explicit.contains(&variable) {
            command.env_remove(variable);
        }
    }
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr).kill_on_drop(true);
    let child = command.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let pid = child.id().expect("a running child has a pid");
    Agent { child, pid, name: name.to_owned(), log, strays: Vec::new() }
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` (`libc::SIGTERM`, `SIGKILL`, `SIGSTOP`, `SIGCONT`, …) to the agent process.
    pub fn kill(&mut self, signal: libc::c_int) {
        self.note_strays();
        let pid = libc::pid_t::try_from(self.pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    /// Waits for the agent to exit and returns its status; panics after `timeout` (the log is printed).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the agent"),
            Err(_) => panic!("{} {} did not exit within {timeout:?}", self.name, self.pid),
        }
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("polling the agent")
    }

    /// Everything the agent has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        let mut file = self.log.reopen().expect("reopening the log file");
        file.read_to_string(&mut text).expect("reading the log file");
        text
    }

    /// Waits until the agent's log contains `needle`; panics after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("\"{needle}\" in the log of {} {}", self.name, self.pid), timeout, || async move {
            self.log().contains(needle).then_some(())
        })
        .await
    }

    /// The pids of the agent's live descendant processes (its job processes and their children).
    pub fn descendants(&self) -> Vec<u32> {
        descendants(self.pid).into_iter().map(|p| p.pid).collect()
    }

    fn note_strays(&mut self) {
        for proc in descendants(self.pid) {
            if !self.strays.contains(&proc) {
                self.strays.push(proc);
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.note_strays();
        let _ = self.child.start_kill();
        for proc in &self.strays {
            proc.kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} {} log ({}) ----\n{}---- end of log ----",
                self.name,
                self.pid,
                self.log.path().display(),
                self.log()
            );
        }
    }
}

/// Whether a process with this pid exists (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|fields| fields.first() != Some(&"Z")),
        Err(_) => false,
    }
}

/// One process, named by pid and start time so a recycled pid is not mistaken for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: u64,
}

impl Proc {
    fn kill(&self) {
        let still_it = read_proc(self.pid).is_some_and(|(_, start)| start == self.start);
        if still_it && let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, … (field 3 onwards).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// `(ppid, start time)` of a live process.
fn read_proc(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&stat)?;
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Every live descendant of `root`, found through the parent links in `/proc`.
fn descendants(root: u32) -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let table: Vec<(u32, u32, u64)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| read_proc(pid).map(|(ppid, start)| (pid, ppid, start)))
        .collect();
    let mut found: Vec<Proc> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for &(pid, ppid, start) in &table {
            if ppid == parent && !found.iter().any(|p| p.pid == pid) {
                found.push(Proc { pid, start });
                parents.push(pid);
            }
        }
    }
    found
}

/// Polls `GetJob` every 20 ms until `done(&job)` holds and returns that job; panics after `timeout` naming
/// `what` and showing the job as last seen.
pub async fn wait_for_job(
    client: &BrokerServiceClient<Channel>,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let mut client = client.clone();
    let deadline = Instant::now() + timeout;
    loop {
        let job = get_job(&mut client, id).await;
        if done(&job) {
            return job;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for job {id}: {what}; last seen: {job:#?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits (via `GetJob`) until job `id` is in `state` and returns it; panics after `timeout`, or at once if the
/// job reaches another terminal state (it can never get to `state` then).
pub async fn wait_for_state(
    client: &BrokerServiceClient<Channel>,
    id: &str,
    state: pb::JobState,
    timeout: Duration,
) -> pb::Job {
    let job = wait_for_job(client, id, &format!("state {state:?}"), timeout, |job| {
        job.state() == state || is_terminal(job.state())
    })
    .await;
    assert_eq!(job.state(), state, "job {id} ended in another state: {job:#?}");
    job
}

/// Whether a job in `state` is finished for good (succeeded, failed or cancelled).
pub fn is_terminal(state: pb::JobState) -> bool {
    matches!(state, pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
}

/// What the [`TestServer`] answers to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// How long to wait before answering (to make a request time out).
    pub delay: Duration,
}

impl Reply {
    /// `status` with an empty body.
    pub fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Vec::new(), delay: Duration::ZERO }
    }

    /// 200 with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply::status(200).body(body)
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// One request the [`TestServer`] received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When its body had been read (just before the reply, unless the reply is delayed).
    pub received_at: SystemTime,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 server on 127.0.0.1 and a port the OS chose, answering every request (any method, any path)
/// from a script and recording it. Replies are used in order; the last one is repeated for every later
/// request (an empty script answers 200 with an empty body). Stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    /// `http://{addr}/`.
    pub url: String,
    state: Arc<Mutex<Exchanges>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Exchanges {
    script: VecDeque<Reply>,
    requests: Vec<Request>,
}

impl TestServer {
    pub async fn start(script: Vec<Reply>) -> TestServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("the bound address");
        let state = Arc::new(Mutex::new(Exchanges { script: script.into(), requests: Vec::new() }));
        let task = tokio::spawn(serve(listener, state.clone()));
        TestServer { addr, url: format!("http://{addr}/"), state, task }
    }

    /// Appends a reply to the script.
    pub fn push(&self, reply: Reply) {
        self.state.lock().expect("server lock").script.push_back(reply);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("server lock").requests.clone()
    }

    /// Waits until at least `count` requests have arrived and returns all of them; panics after `timeout`.
    pub async fn wait_for_requests(&self, count: usize, timeout: Duration) -> Vec<Request> {
        wait_for(&format!("{count} request(s) at the test HTTP server"), timeout, || async move {
            let requests = self.requests();
            (requests.len() >= count).then_some(requests)
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; each connection is served by hyper in a task of the set, which dies with it.
async fn serve(listener: TcpListener, state: Arc<Mutex<Exchanges>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| answer(state.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn answer(
    state: Arc<Mutex<Exchanges>>,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    let recorded = Request {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect(),
        body,
        received_at: SystemTime::now(),
    };
    let reply = {
        let mut state = state.lock().expect("server lock");
        state.requests.push(recorded);
        let next = if state.script.len() > 1 { state.script.pop_front() } else { state.script.front().cloned() };
        next.unwrap_or_else(|| Reply::status(200))
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = hyper::Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    Ok(response.body(Full::new(Bytes::from(reply.body))).expect("a scripted reply is a valid response"))
}

/// `http://127.0.0.1:<port>/` where nothing listens (a port just bound and released).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("binding 127.0.0.1:0");
    let addr = listener.local_addr().expect("the bound address");
    drop(listener);
    format!("http://{addr}/")
}
