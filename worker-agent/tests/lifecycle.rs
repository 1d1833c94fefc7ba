//! The agent's life among real processes and real signals: an agent killed mid-job (its guard kills its command,
//! its job finishes elsewhere exactly once), an agent frozen past its lease (its late result is refused and its job process killed once it
//! wakes), SIGTERM drain and a second SIGTERM, a client's cancel, and a broker restart under running jobs.
//!
//! Every job here is a shell command run by `--exec`; it leaves marker files (pids, runs, start order) in a
//! scratch directory so the test knows what ran where. A command that must run until the test says so waits for a
//! file the test creates (or sleeps far longer than the test); the test itself never sleeps to synchronise. Each
//! agent's command is different, so a result names the agent that produced it.

mod support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use sqlx::Connection as _;
use support::*;
use tonic::transport::Channel;

const QUEUE: &str = "scripts";
/// Long enough that only a closed stream (and its 1 s reconnect grace) makes such a lease expire in a test.
const LONG_TTL: Duration = Duration::from_secs(30);
/// How long a test waits for something that should take well under a second or two.
const SOON: Duration = Duration::from_secs(10);
/// How long a test waits for a job to travel through lost-lease detection and another agent.
const EVENTUALLY: Duration = Duration::from_secs(20);

/// Log lines of `jobbroker::worker` (src/worker.rs) that the frozen-agent test waits on.
const LEASE_LOST: &str = "lease lost";
const DROPPED_UNREPORTED: &str = "dropping the job without reporting";
const RESULT_DROPPED: &str = "the result is dropped";
/// What the agent logs when the first SIGTERM starts its drain (worker-agent/src/lib.rs).
const DRAINING: &str = "draining: no new jobs";

/// A job for the shell commands below with `payload` on its stdin and the given lease TTL.
fn spec(payload: &str, lease_ttl: Duration) -> pb::JobSpec {
    pb::JobSpec { lease_ttl: Some(duration(lease_ttl)), ..pb::JobSpec::new(QUEUE, "script", payload.as_bytes()) }
}

/// `worker-agent --queue scripts --worker-id <id> --capacity <n> --exec <command> <extra…>`.
fn agent(broker: &TestBroker, id: &str, capacity: u32, exec: &str, extra: &[&str]) -> Agent {
    let capacity = capacity.to_string();
    let mut args = vec!["--queue", QUEUE, "--worker-id", id, "--capacity", &capacity, "--exec", exec];
    args.extend_from_slice(extra);
    spawn_agent(&broker.url, &args, &[])
}

/// A scratch directory for marker files, deleted with the test; `{dir}` in commands is its quoted path.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { dir: tempfile::Builder::new().prefix("agent-lifecycle-").tempdir().expect("a scratch directory") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `command` with every `{dir}` replaced by the directory's single-quoted path.
    fn script(&self, command: &str) -> String {
        command.replace("{dir}", &format!("'{}'", self.dir.path().display()))
    }

    fn touch(&self, name: &str) {
        std::fs::write(self.path(name), b"").expect("creating a marker file");
    }

    /// The lines of marker file `name` (none if it does not exist yet).
    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(name)).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// Waits for marker file `name` to hold a pid (commands write `$$` or `$!` to it) and returns it.
    async fn pid(&self, name: &str) -> u32 {
        let path = self.path(name);
        wait_for(&format!("a pid in {}", path.display()), SOON, || async { read_pid(&path) }).await
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

async fn wait_gone(pids: &[u32], why: &str) {
    wait_for(&format!("processes {pids:?} to be gone ({why})"), SOON, || async {
        pids.iter().all(|&pid| !process_alive(pid)).then_some(())
    })
    .await;
}

/// The `(state, attempt)` rows of `finished_jobs` for job `id`, and how many rows `jobs` still has for it.
async fn rows(database: &str, id: &str) -> (Vec<(String, i32)>, i64) {
    let mut conn = sqlx::PgConnection::connect(database).await.expect("connecting to the test database");
    let finished = sqlx::query_as("SELECT state, attempt FROM finished_jobs WHERE id = $1::uuid")
        .bind(id)
        .fetch_all(&mut conn)
        .await
        .expect("reading finished_jobs");
    let live = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .expect("reading jobs");
    let _ = conn.close().await;
    (finished, live)
}

/// Asserts that job `id` was recorded exactly once, as `state` at `attempt`, and left the live table.
async fn assert_recorded_once(database: &str, id: &str, state: &str, attempt: i32) {
    let (finished, live) = rows(database, id).await;
    assert_eq!(finished, vec![(state.to_owned(), attempt)], "finished_jobs rows of job {id}");
    assert_eq!(live, 0, "job {id} is finished yet still has a row in jobs");
}

/// Asserts that job `id` stays QUEUED and unattempted for `wait` (a bounded wait where nothing must happen).
async fn assert_stays_queued(client: &BrokerServiceClient<Channel>, id: &str, wait: Duration) {
    let mut client = client.clone();
    let until = Instant::now() + wait;
    while Instant::now() < until {
        let job = get_job(&mut client, id).await;
        assert_eq!((job.state(), job.attempt), (pb::JobState::Queued, 0), "job {id} was taken: {job:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_job_whose_agent_is_killed_is_finished_by_another_agent_exactly_once() {
    let database = test_database().await;
    let broker = TestBroker::start(fast_settings(database.clone())).await;
    let mut client = broker.client().await;
    let dir = Scratch::new();

    // A records its pid and its child's and then works far longer than the test; B records the attempt it ran
    // and answers.
    let a_exec =
        dir.script("sleep 60 & echo $! > {dir}/a-$JOB_ID.child; echo $$ > {dir}/a-$JOB_ID.pid; wait; echo from-a");
    let b_exec = dir.script("echo $JOB_ATTEMPT >> {dir}/b-$JOB_ID.runs; echo from-b");
    let mut a = agent(&broker, "agent-a", 1, &a_exec, &[]);
    let id = enqueue(&mut client, vec![spec("", LONG_TTL)]).await.remove(0);
    let command = dir.pid(&format!("a-{id}.pid")).await;
    let child = dir.pid(&format!("a-{id}.child")).await;
    let b = agent(&broker, "agent-b", 1, &b_exec, &[]);

    a.kill(libc::SIGKILL);
    let killed = Instant::now();
    assert!(!a.wait_exit(SOON).await.success());
    // A could not stop its command, but its process group guard outlived it and killed the whole group.
    wait_gone(&[command, child], "the killed agent's guard killed its command's process group").await;
    let job = wait_for_state(&client, &id, pb::JobState::Succeeded, EVENTUALLY).await;
    let elapsed = killed.elapsed();
    println!("finished by the second agent {elapsed:?} after the first was killed");

    assert_eq!(job.attempt, 2, "the second agent ran the second attempt");
    assert_eq!(job.worker_id, "agent-b");
    assert_eq!(job.result, b"from-b\n");
    assert_eq!(dir.lines(&format!("b-{id}.runs")), ["2"], "the second agent ran the job once");
    // The closed stream (reconnect grace 1 s), not the 30 s lease TTL, freed the job.
    assert!(elapsed < LONG_TTL / 2, "the job was re-run only {elapsed:?} after its agent died");
    assert_recorded_once(&database, &id, "succeeded", 2).await;
    drop(b);
    broker.stop().await;
}

#[tokio::test]
async fn an_agent_frozen_past_its_leases_loses_them_and_its_late_result_is_refused() {
    let database = test_database().await;
    let mut settings = fast_settings(database.clone());
    // HTTP/2 keepalive is how the broker notices a frozen worker's stream (it answers no ping): the stream is
    // closed within ~1 s, before the 3 s leases lapse, so the re-queued jobs go to the live agent only.
    settings.keepalive = Duration::from_millis(500);
    let broker = TestBroker::start(settings).await;
    let client = broker.client().await;
    let dir = Scratch::new();
    let ttl = Duration::from_secs(3);

    // On A, a "long" job runs a child for a minute; a "short" one ends as soon as the test creates `a-go`.
    let a_exec = dir.script(
        "echo run >> {dir}/a-$JOB_ID.runs; read mode; \
         if [ \"$mode\" = long ]; then \
           sleep 60 & echo $! > {dir}/a-$JOB_ID.child; echo $$ > {dir}/a-$JOB_ID.pid; wait; \
         else \
           echo $$ > {dir}/a-$JOB_ID.pid; while [ ! -e {dir}/a-go ]; do sleep 0.05; done; \
         fi; echo from-a",
    );
    // On B, every job ends when the test creates `b-go`.
    let b_exec = dir.script(
        "echo $JOB_ATTEMPT >> {dir}/b-$JOB_ID.runs; while [ ! -e {dir}/b-go ]; do sleep 0.05; done; echo from-b",
    );
    let mut a = agent(&broker, "agent-a", 2, &a_exec, &[]);
    let ids = enqueue(&mut client.clone(), vec![spec("short\n", ttl), spec("long\n", ttl)]).await;
    let (short, long) = (ids[0].clone(), ids[1].clone());
    let short_pid = dir.pid(&format!("a-{short}.pid")).await;
    let long_pid = dir.pid(&format!("a-{long}.pid")).await;
    let long_child = dir.pid(&format!("a-{long}.child")).await;
    let b = agent(&broker, "agent-b", 2, &b_exec, &[]);

    a.kill(libc::SIGSTOP);
    // The short job's command finishes while its agent is frozen: A holds a result it cannot report yet.
    dir.touch("a-go");
    wait_gone(&[short_pid], "the short job's command ended while its agent is frozen").await;
    for id in [&short, &long] {
        let job = wait_for_job(&client, id, "leased by agent-b at attempt 2", EVENTUALLY, |job| {
            job.state() == pb::JobState::Leased && job.worker_id == "agent-b"
        })
        .await;
        assert_eq!(job.attempt, 2, "the frozen agent's attempt was lost once: {job:#?}");
        assert_eq!(job.last_error, "lease expired");
    }
    // Leased to B is recorded before B's command starts: wait for the command's first line.
    for id in [&short, &long] {
        let runs = format!("b-{id}.runs");
        wait_for("agent-b to start the job's command", SOON, || async { (!dir.lines(&runs).is_empty()).then_some(()) })
            .await;
        assert_eq!(dir.lines(&runs), ["2"], "agent-b ran the second attempt of job {id} once");
    }
    assert!(process_alive(long_pid) && process_alive(long_child), "the long job runs on while A is frozen");

    a.kill(libc::SIGCONT);
    // A learns its leases are gone: it kills the long job's process group and reports nothing for it; the
    // short job's result is either refused by the broker (ABORTED) or dropped unreported.
    wait_gone(&[long_pid, long_child], "A killed the job whose lease it lost").await;
    a.wait_for_log(LEASE_LOST, SOON).await;
    wait_for("A to have dealt with both lost jobs", SOON, || async {
        let log = a.log();
        (log.matches(DROPPED_UNREPORTED).count() + log.matches(RESULT_DROPPED).count() >= 2).then_some(())
    })
    .await;
    for id in [&short, &long] {
        let job = get_job(&mut client.clone(), id).await;
        assert_eq!((job.state(), job.attempt, job.worker_id.as_str()), (pb::JobState::Leased, 2, "agent-b"));
        assert!(job.result.is_empty(), "A's late result was recorded: {job:#?}");
    }
    assert!(a.try_exit().is_none(), "the agent lives on after losing its leases");

    dir.touch("b-go");
    for id in [&short, &long] {
        let job = wait_for_state(&client, id, pb::JobState::Succeeded, SOON).await;
        assert_eq!((job.attempt, job.result.as_slice()), (2, b"from-b\n".as_slice()), "B's result stands");
        assert_recorded_once(&database, id, "succeeded", 2).await;
        assert_eq!(dir.lines(&format!("a-{id}.runs")).len(), 1, "A ran job {id} once, never again");
    }
    drop((a, b));
    broker.stop().await;
}

#[tokio::test]
async fn sigterm_lets_running_jobs_finish_leaves_queued_ones_for_others_and_exits_zero() {
    let database = test_database().await;
    let broker = TestBroker::start(fast_settings(database.clone())).await;
    let mut client = broker.client().await;
    let dir = Scratch::new();

    let exec = dir.script("echo $JOB_ID >> {dir}/started; sleep 1.5; echo done-$JOB_ID");
    let specs = (0..4).map(|i| pb::JobSpec::new(QUEUE, "script", format!("job {i}").into_bytes())).collect();
    let ids = enqueue(&mut client, specs).await;
    let mut a = agent(&broker, "agent-a", 2, &exec, &["--drain-grace", "30s"]);
    wait_for("two jobs running", SOON, || async { (dir.lines("started").len() == 2).then_some(()) }).await;

    a.kill(libc::SIGTERM);
    let sent = Instant::now();
    let status = a.wait_exit(EVENTUALLY).await;
    let elapsed = sent.elapsed();
    println!("the agent drained and exited {elapsed:?} after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after a drain: {status:?}");
    // It left as soon as its jobs were done, not after the 30 s drain grace.
    assert!(elapsed < Duration::from_secs(10), "drained in {elapsed:?}");

    let started = dir.lines("started");
    assert_eq!(started.len(), 2, "no job started after SIGTERM: {started:?}");
    let (ran, left): (Vec<&String>, Vec<&String>) = ids.iter().partition(|id| started.contains(id));
    for id in &ran {
        let job = get_job(&mut client, id).await;
        assert_eq!(job.state(), pb::JobState::Succeeded, "a running job finished before the agent exited");
        assert_eq!((job.attempt, job.result), (1, format!("done-{id}\n").into_bytes()));
    }
    for id in &left {
        let job = get_job(&mut client, id).await;
        assert_eq!((job.state(), job.attempt), (pb::JobState::Queued, 0), "job {id} was left for others");
    }

    let _b = agent(&broker, "agent-b", 2, &exec, &[]);
    for id in &left {
        let job = wait_for_state(&client, id, pb::JobState::Succeeded, EVENTUALLY).await;
        assert_eq!((job.attempt, job.worker_id.as_str()), (1, "agent-b"));
    }
    for id in &ids {
        assert_recorded_once(&database, id, "succeeded", 1).await;
    }
    assert_eq!(dir.lines("started").len(), 4, "every job ran exactly once");
    broker.stop().await;
}

#[tokio::test]
async fn a_second_sigterm_releases_running_jobs_at_once() {
    let database = test_database().await;
    let broker = TestBroker::start(fast_settings(database.clone())).await;
    let mut client = broker.client().await;
    let dir = Scratch::new();

    let exec = dir.script("sleep 30 & echo $! > {dir}/child; echo $$ > {dir}/pid; wait; echo finished");
    let id = enqueue(&mut client, vec![pb::JobSpec::new(QUEUE, "script", b"".as_slice())]).await.remove(0);
    let mut a = agent(&broker, "agent-a", 1, &exec, &["--drain-grace", "30s"]);
    let pids = [dir.pid("pid").await, dir.pid("child").await];

    a.kill(libc::SIGTERM);
    a.wait_for_log(DRAINING, SOON).await;
    // Draining: the job runs on.
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state(), pb::JobState::Leased);
    assert!(pids.iter().all(|&pid| process_alive(pid)), "the first SIGTERM lets the job run");

    a.kill(libc::SIGTERM);
    let sent = Instant::now();
    let status = a.wait_exit(SOON).await;
    let elapsed = sent.elapsed();
    println!("the agent exited {elapsed:?} after the second SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after a second SIGTERM: {status:?}");
    assert!(elapsed < Duration::from_secs(5), "released in {elapsed:?}, not at once");
    wait_gone(&pids, "the released job's processes were killed").await;

    let job = get_job(&mut client, &id).await;
    assert_eq!((job.state(), job.attempt), (pb::JobState::Queued, 0), "released, not failed: {job:#?}");
    assert!(job.last_error.is_empty(), "a release records no error: {job:#?}");
    broker.stop().await;
}

#[tokio::test]
async fn cancelling_a_running_exec_job_kills_its_processes_and_ends_it_cancelled() {
    let database = test_database().await;
    let broker = TestBroker::start(fast_settings(database.clone())).await;
    let mut client = broker.client().await;
    let dir = Scratch::new();

    // The shell and its child: both must die.
    let exec = dir.script("sleep 30 & echo $! > {dir}/child; echo $$ > {dir}/pid; wait; echo finished");
    let _a = agent(&broker, "agent-a", 1, &exec, &[]);
    let id = enqueue(&mut client, vec![pb::JobSpec::new(QUEUE, "script", b"".as_slice())]).await.remove(0);
    let pids = [dir.pid("pid").await, dir.pid("child").await];
    assert_eq!(get_job(&mut client, &id).await.state(), pb::JobState::Leased);

    let cancelled = Instant::now();
    client.cancel_job(pb::CancelJobRequest { id: id.clone() }).await.expect("cancel");
    let job = wait_for_state(&client, &id, pb::JobState::Cancelled, SOON).await;
    let elapsed = cancelled.elapsed();
    wait_gone(&pids, "the cancelled job's processes were killed").await;
    println!("cancelled {elapsed:?} after CancelJob");
    // Far sooner than the command's 30 s: the agent killed it.
    assert!(elapsed < Duration::from_secs(5), "the job ended {elapsed:?} after CancelJob");
    assert_eq!(job.attempt, 1);
    assert!(job.result.is_empty(), "a killed command reports no result: {job:#?}");
    assert_recorded_once(&database, &id, "cancelled", 1).await;
    broker.stop().await;
}

#[tokio::test]
async fn jobs_running_across_a_broker_restart_finish_exactly_once() {
    let database = test_database().await;
    let settings = fast_settings(database.clone());
    let broker = TestBroker::start(settings.clone()).await;
    let addr = broker.addr;
    let mut client = broker.client().await;
    let dir = Scratch::new();

    // Each job reports progress (a counter) until the test creates `go`.
    let exec = dir.script(
        "echo $JOB_ID >> {dir}/started; n=0; \
         while [ ! -e {dir}/go ]; do n=$((n+1)); echo \"##jobbroker:progress 50 tick $n\" >&2; sleep 0.1; done; \
         echo done-$JOB_ID",
    );
    // A lease TTL that outlasts the restart (the agent cannot heartbeat meanwhile).
    let ttl = Duration::from_secs(10);
    let ids = enqueue(&mut client, (0..3).map(|_| spec("", ttl)).collect()).await;
    let _a = agent(&broker, "agent-a", 2, &exec, &[]);
    wait_for("two jobs running", SOON, || async { (dir.lines("started").len() == 2).then_some(()) }).await;
    let started = dir.lines("started");
    let running: Vec<String> = ids.iter().filter(|id| started.contains(id)).cloned().collect();
    let waiting = ids.iter().find(|id| !started.contains(id)).expect("a third job").clone();

    broker.stop().await;
    let before = progress_in_database(&database, &running).await;
    let broker = TestBroker::start_on(settings, addr).await;
    let client = broker.client().await;
    // Heartbeats reach the new broker: the agent reconnected and registered its held leases.
    wait_for("heartbeats through the restarted broker", EVENTUALLY, || async {
        (progress_in_database(&database, &running).await != before).then_some(())
    })
    .await;
    for id in &running {
        let job = get_job(&mut client.clone(), id).await;
        assert_eq!((job.state(), job.attempt, job.worker_id.as_str()), (pb::JobState::Leased, 1, "agent-a"));
    }
    // The adopted leases fill the agent's capacity again: the third job waits.
    assert_stays_queued(&client, &waiting, Duration::from_secs(1)).await;

    dir.touch("go");
    for id in &ids {
        let job = wait_for_state(&client, id, pb::JobState::Succeeded, EVENTUALLY).await;
        assert_eq!((job.attempt, job.result), (1, format!("done-{id}\n").into_bytes()));
        assert_recorded_once(&database, id, "succeeded", 1).await;
    }
    let mut started = dir.lines("started");
    started.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(started, expected, "each job ran exactly once");
    broker.stop().await;
}

/// The progress messages stored for `ids`, read straight from Postgres (no broker needed).
async fn progress_in_database(database: &str, ids: &[String]) -> Vec<Option<String>> {
    let mut conn = sqlx::PgConnection::connect(database).await.expect("connecting to the test database");
    let mut messages = Vec::new();
    for id in ids {
        let message = sqlx::query_scalar("SELECT progress_message FROM jobs WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .expect("reading a job's progress");
        messages.push(message);
    }
    let _ = conn.close().await;
    messages
}
