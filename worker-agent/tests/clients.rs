//! The Python and Node clients of `examples/` against a live broker: they enqueue, watch and work jobs with only
//! the published protos and their language's standard gRPC library, side by side with the Rust worker agent.
//!
//! The tooling (a Python venv with the pinned grpcio packages and the generated stubs, the Node modules of the
//! committed lock file, buf) is installed by `examples/setup.sh` into `target/polyglot/` on the first run, from
//! PyPI and npm; later runs find it there. It needs `python3` and `node` (with `npm`) on PATH. Each example runs as
//! the real script in its own process, as a user would start it.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use sqlx::Connection as _;
use support::{
    common::{polyglot, worker::instant},
    *,
};
use tokio::{io::AsyncWriteExt as _, process::Command};
use tonic::transport::Channel;

/// How long a test waits for something that should take a second or two.
const SOON: Duration = Duration::from_secs(30);
/// How long a test waits for many jobs, or for a job to travel through lost-lease detection and another worker.
const EVENTUALLY: Duration = Duration::from_secs(60);

/// Where `examples/setup.sh` put the tooling.
struct Tools {
    /// The venv's interpreter; its site-packages hold the pinned packages and the generated stubs.
    python: PathBuf,
    /// `NODE_PATH` for the Node examples.
    node_modules: PathBuf,
    buf: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root")
}

/// Runs `examples/setup.sh` once per test process (it is quick when nothing changed, and serialises concurrent
/// callers on a lock file).
fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let cache = polyglot::install();
        Tools {
            python: cache.join("python/venv/bin/python"),
            node_modules: cache.join("node/node_modules"),
            buf: cache.join("buf/node_modules/.bin/buf"),
        }
    })
}

/// `python examples/python/<script> <args…>` with the venv's interpreter.
fn python(script: &str, args: &[&str]) -> Command {
    let mut command = Command::new(&tools().python);
    command.arg(repo().join("examples/python").join(script)).args(args);
    // No __pycache__ in the source tree; log lines reach the log file as they are written.
    command.env("PYTHONDONTWRITEBYTECODE", "1").env("PYTHONUNBUFFERED", "1");
    command
}

/// `node examples/node/<script> <args…>` with the installed modules.
fn node(script: &str, args: &[&str]) -> Command {
    let mut command = Command::new("node");
    command.arg(repo().join("examples/node").join(script)).args(args).env("NODE_PATH", &tools().node_modules);
    command
}

/// Runs `command` to its end with `stdin` as its input; panics naming `what` if it takes longer than [`SOON`].
async fn run(what: &str, mut command: Command, stdin: &str) -> Output {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut input = child.stdin.take().expect("a piped stdin");
    input.write_all(stdin.as_bytes()).await.expect("writing stdin");
    drop(input);
    match tokio::time::timeout(SOON, child.wait_with_output()).await {
        Ok(output) => output.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => panic!("{what} did not finish within {SOON:?}"),
    }
}

/// Like [`run`], and asserts that it succeeded; returns its stdout.
async fn run_ok(what: &str, command: Command, stdin: &str) -> String {
    let output = run(what, command, stdin).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed ({}); stderr:\n{stderr}", output.status);
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The job ids of enqueue.py / enqueue.js output (`<id> created|existing` per line), asserting each word.
fn enqueued_ids(stdout: &str, word: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|line| {
            let (id, said) = line.split_once(' ').unwrap_or_else(|| panic!("unexpected enqueue output {line:?}"));
            assert_eq!(said, word, "enqueue output line {line:?}");
            id.to_owned()
        })
        .collect()
}

/// The example handlers' result: `{"worker": …, "text": …}`.
fn handler_result(job: &pb::Job) -> (String, String) {
    let result: serde_json::Value = serde_json::from_slice(&job.result).expect("the result is JSON");
    (result["worker"].as_str().unwrap_or_default().into(), result["text"].as_str().unwrap_or_default().into())
}

/// How many rows `table` holds (`jobs`: live jobs, `finished_jobs`: terminal ones), optionally for one job.
async fn count_rows(database: &str, table: &str, id: Option<&str>) -> i64 {
    let mut conn = sqlx::PgConnection::connect(database).await.expect("connecting to the test database");
    let sql = format!("SELECT count(*) FROM {table} WHERE $1::uuid IS NULL OR id = $1::uuid");
    let count = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(id).fetch_one(&mut conn).await;
    let _ = conn.close().await;
    count.unwrap_or_else(|e| panic!("counting rows of {table}: {e}"))
}

/// A broker with the agent tests' fast timings (2 s leases, 1 s reconnect grace) on a database of its own, once
/// the tooling is installed.
struct Live {
    database: String,
    broker: TestBroker,
    client: BrokerServiceClient<Channel>,
    /// `host:port`, as the scripts' `--broker` takes it.
    addr: String,
}

impl Live {
    async fn start() -> Live {
        tools();
        let database = test_database().await;
        let broker = TestBroker::start(fast_settings(database.clone())).await;
        let client = broker.client().await;
        let addr = broker.addr.to_string();
        Live { database, broker, client, addr }
    }

    /// `enqueue.py --broker <addr> <args…>` with `stdin`; the ids it printed, each of a job it created.
    async fn enqueue_py(&self, args: &[&str], stdin: &str) -> Vec<String> {
        let command = python("enqueue.py", &[&["--broker", &self.addr], args].concat());
        enqueued_ids(&run_ok("enqueue.py", command, stdin).await, "created")
    }

    /// `worker.py` as `py-1` on `queue` with `args`, once it runs job `id` and has reported progress on a heartbeat.
    async fn python_worker_running(&self, queue: &str, args: &[&str], id: &str) -> Agent {
        let worker = [&["--broker", &self.addr, "--queue", queue, "--worker-id", "py-1"], args].concat();
        let worker = spawn_process("python worker.py", python("worker.py", &worker));
        wait_for_job(&self.client, id, "py-1 running it and reporting progress", SOON, |job| {
            job.worker_id == "py-1" && job.progress.as_ref().is_some_and(|p| p.percent > 0)
        })
        .await;
        worker
    }

    /// `node worker.js` as `node-1` on `queue`.
    fn node_worker(&self, queue: &str) -> Agent {
        spawn_process(
            "node worker.js",
            node("worker.js", &["--broker", &self.addr, "--queue", queue, "--worker-id", "node-1"]),
        )
    }

    /// Asserts that job `id` was recorded as finished exactly once and left the live table.
    async fn assert_finished_once(&self, id: &str) {
        assert_eq!(count_rows(&self.database, "finished_jobs", Some(id)).await, 1, "job {id} completed exactly once");
        assert_eq!(count_rows(&self.database, "jobs", Some(id)).await, 0, "job {id} finished yet still live");
    }
}

#[tokio::test]
async fn python_enqueues_200_jobs_that_the_python_worker_completes() {
    let live = Live::start().await;
    let pages: String = (1..=200).map(|i| format!("{{\"text\": \"page {i}\"}}\n")).collect();
    let batch = ["--queue", "pages", "--kind", "render", "--priority", "5", "--key", "book-1", "--batch"];

    let ids = live.enqueue_py(&batch, &pages).await;
    assert_eq!(ids.len(), 200);
    // The same keys again: the same jobs, nothing new.
    let again = python("enqueue.py", &[&["--broker", live.addr.as_str()], &batch[..]].concat());
    assert_eq!(enqueued_ids(&run_ok("enqueue.py (again)", again, &pages).await, "existing"), ids);

    // A delayed job, followed by watch.py from before it may run until it ends.
    let late =
        live.enqueue_py(&["--queue", "pages", "--kind", "render", "--delay", "3", r#"{"text": "late"}"#], "").await;
    let watch = python("watch.py", &["--broker", &live.addr, "--timeout", "60", &late[0]]);
    let watch = tokio::spawn(run("watch.py", watch, ""));

    let worker = ["--broker", &live.addr, "--queue", "pages", "--capacity", "8", "--worker-id", "py-1"];
    let _worker = spawn_process("python worker.py", python("worker.py", &worker));
    for (i, id) in ids.iter().enumerate() {
        let job = wait_for_state(&live.client, id, pb::JobState::Succeeded, EVENTUALLY).await;
        assert_eq!(handler_result(&job), ("py-1".into(), format!("PAGE {}", i + 1)), "result of job {id}");
        assert_eq!((job.attempt, job.spec.as_ref().map(|s| s.priority)), (1, Some(5)), "job {id}");
    }

    let watched = watch.await.expect("the watch task");
    let (stdout, stderr) = (String::from_utf8_lossy(&watched.stdout), String::from_utf8_lossy(&watched.stderr));
    assert!(watched.status.success(), "watch.py failed ({}); stderr:\n{stderr}", watched.status);
    let job = get_job(&mut live.client.clone(), &late[0]).await;
    assert_eq!(handler_result(&job), ("py-1".into(), "LATE".into()));
    assert_eq!(stdout.as_bytes(), job.result, "watch.py prints the result");
    let states: Vec<&str> = stderr.lines().filter_map(|line| line.split(' ').next()).collect();
    assert_eq!(states.first(), Some(&"QUEUED"), "watch.py saw the delayed job queued first:\n{stderr}");
    assert_eq!(states.last(), Some(&"SUCCEEDED"), "watch.py followed the job to its end:\n{stderr}");
    let delay = instant(job.run_at.as_ref()) - instant(job.spec.as_ref().and_then(|s| s.run_at.as_ref()));
    assert_eq!(delay, chrono::TimeDelta::zero(), "the job keeps the run_at enqueue.py asked for");
    let waited = instant(job.run_at.as_ref()) - instant(job.created_at.as_ref());
    assert!(waited >= chrono::TimeDelta::milliseconds(2500), "run_at is --delay after the enqueue: {waited}");
    assert!(instant(job.finished_at.as_ref()) >= instant(job.run_at.as_ref()), "the job ran before its run_at");
}

#[tokio::test]
async fn node_enqueues_and_watches_a_job_that_the_rust_agent_completes() {
    let live = Live::start().await;
    let _agent = spawn_agent(&live.broker.url, &["--queue", "node-jobs", "--exec", "tr a-z A-Z"], &[]);

    let enqueue =
        ["--broker", &live.addr, "--queue", "node-jobs", "--kind", "upper", "--priority", "3", "hello from node"];
    let id = enqueued_ids(&run_ok("enqueue.js", node("enqueue.js", &enqueue), "").await, "created").remove(0);
    let result = run_ok("watch.js", node("watch.js", &["--broker", &live.addr, &id]), "").await;

    assert_eq!(result, "HELLO FROM NODE", "watch.js prints the agent's result");
    let job = get_job(&mut live.client.clone(), &id).await;
    assert_eq!(job.state(), pb::JobState::Succeeded);
    assert_eq!(job.spec.as_ref().map(|s| (s.kind.as_str(), s.priority)), Some(("upper", 3)));
}

#[tokio::test]
async fn a_python_worker_killed_mid_job_has_its_job_finished_by_a_node_worker() {
    let live = Live::start().await;
    // A 30 s lease: only the closed stream (and the broker's 1 s reconnect grace) can free the job this soon.
    let job =
        ["--queue", "chapters", "--kind", "render", "--lease-ttl", "30", r#"{"text": "chapter 1", "seconds": 6}"#];
    let id = live.enqueue_py(&job, "").await.remove(0);
    let mut py = live.python_worker_running("chapters", &[], &id).await;
    let node = live.node_worker("chapters");
    node.wait_for_log("lease stream open", SOON).await;

    py.kill(libc::SIGKILL);

    let job = wait_for_state(&live.client, &id, pb::JobState::Succeeded, EVENTUALLY).await;
    assert_eq!(handler_result(&job), ("node-1".into(), "CHAPTER 1".into()), "the Node worker's result");
    assert_eq!((job.worker_id.as_str(), job.attempt), ("node-1", 2));
    live.assert_finished_once(&id).await;
}

#[tokio::test]
async fn a_frozen_python_worker_drops_its_lost_job_without_reporting() {
    let live = Live::start().await;
    // The test broker's 2 s lease: a worker frozen for longer loses the job.
    let id = live
        .enqueue_py(&["--queue", "frozen", "--kind", "render", r#"{"text": "t", "seconds": 4}"#], "")
        .await
        .remove(0);
    let mut py = live.python_worker_running("frozen", &["--capacity", "1"], &id).await;

    py.kill(libc::SIGSTOP);
    let _node = live.node_worker("frozen");
    let job = wait_for_state(&live.client, &id, pb::JobState::Succeeded, EVENTUALLY).await;
    py.kill(libc::SIGCONT);

    // Its next heartbeat (due at once) tells py-1 the lease is gone, long before the handler would finish: it stops
    // the job and reports nothing.
    py.wait_for_log(&format!("job {id}: lease lost; dropping it without reporting"), SOON).await;
    assert!(!py.log().contains(&format!("job {id} -> ")), "py-1 completed a job it had lost:\n{}", py.log());
    assert_eq!((handler_result(&job), job.attempt), (("node-1".into(), "T".into()), 2), "the Node worker's result");
    live.assert_finished_once(&id).await;
}

#[tokio::test]
async fn bad_input_from_python_gets_each_field_named_and_stores_nothing() {
    let live = Live::start().await;
    let bad = ["--broker", &live.addr, "--queue", "no spaces", "--kind", "render", "--priority", "5000"];
    let bad = [&bad[..], &["--lease-ttl", "0.0001", "payload"]].concat();

    let output = run("enqueue.py with bad input", python("enqueue.py", &bad), "").await;

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "enqueue.py exits 2 on INVALID_ARGUMENT; stderr:\n{stderr}");
    assert!(stderr.starts_with("INVALID_ARGUMENT: "), "{stderr}");
    // These lines come from the google.rpc.BadRequest details, decoded with grpcio-status.
    for field in ["jobs[0].queue", "jobs[0].priority", "jobs[0].lease_ttl"] {
        assert!(stderr.contains(&format!("\n  bad field {field}: ")), "no BadRequest line for {field}:\n{stderr}");
    }
    assert!(output.stdout.is_empty(), "nothing was enqueued, so no id is printed");
    assert_eq!(count_rows(&live.database, "jobs", None).await, 0, "bad input stored a job");
}

#[tokio::test]
async fn the_protos_pass_buf_lint_and_reflection_serves_every_comment() {
    let mut lint = Command::new(&tools().buf);
    lint.arg("lint").current_dir(repo());
    run_ok("buf lint (buf.yaml: STANDARD and COMMENTS)", lint, "").await;

    let live = Live::start().await;
    let described =
        run_ok("describe.py --check", python("describe.py", &["--broker", &live.addr, "--check"]), "").await;

    // Comments of an RPC, a field and an enum value, as reflection hands them to grpcurl and friends.
    for expected in [
        "rpc Enqueue(jobbroker.v1.EnqueueRequest) returns (jobbroker.v1.EnqueueResponse)  // Enqueue stores a batch",
        "  lease_id  // Fencing token: name it in Heartbeat and Complete.",
        "  JOB_STATE_QUEUED  // Waiting to be leased",
    ] {
        assert!(described.contains(expected), "reflection lacks {expected:?}:\n{described}");
    }
}
