//! The agent's handlers end to end: a real broker (in-process, on a test database), the real `worker-agent`
//! binary, real commands and a real HTTP server. Each test enqueues jobs through the generated client and
//! checks what the broker recorded (`GetJob`) and what the command or the server saw.

mod support;

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use jobbroker::v1::{self as pb, JobState};
use support::*;

/// Deadline for anything the agent should do in well under a second or two; only reached when a test fails.
const WAIT: Duration = Duration::from_secs(20);
const QUEUE: &str = "work";

/// A spec on [`QUEUE`] whose retries come back quickly (50 ms, no growth).
fn job(kind: &str, payload: impl Into<Vec<u8>>) -> pb::JobSpec {
    let mut spec = pb::JobSpec::new(QUEUE, kind, payload);
    spec.retry = Some(pb::RetryPolicy {
        initial_backoff: Some(proto_duration(Duration::from_millis(50))),
        max_backoff: Some(proto_duration(Duration::from_millis(50))),
        multiplier: 1.0,
    });
    spec
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    duration.try_into().expect("a small duration")
}

fn time(timestamp: Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(timestamp.expect("a timestamp")).expect("a valid timestamp")
}

async fn enqueue_one(broker: &TestBroker, spec: pb::JobSpec) -> String {
    let mut client = broker.client().await;
    enqueue(&mut client, vec![spec]).await.remove(0)
}

/// An agent on [`QUEUE`] with the given default-handler flags.
fn agent(broker: &TestBroker, handler: &[&str]) -> Agent {
    let mut args = vec!["--queue", QUEUE];
    args.extend_from_slice(handler);
    spawn_agent(&broker.url, &args, &[])
}

/// Waits until `path` holds a pid (written whole, by `mv`) and returns it.
async fn read_pid(path: &Path) -> u32 {
    wait_for(&format!("a pid in {}", path.display()), WAIT, || async move {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
    .await
}

fn result_text(job: &pb::Job) -> String {
    String::from_utf8_lossy(&job.result).into_owned()
}

// ---- exec ----

#[tokio::test]
async fn exec_succeeds_with_stdout_as_result_payload_on_stdin_and_the_job_in_the_environment() {
    let broker = start_broker().await;
    let script = r#"printf 'stdin=%s\n' "$(cat)"
printf 'id=%s kind=%s queue=%s attempt=%s trace=%s lease=%s\n' \
  "$JOB_ID" "$JOB_KIND" "$JOB_QUEUE" "$JOB_ATTEMPT" "$JOB_META_TRACE_ID" "${JOB_LEASE_ID:+set}""#;
    let _agent = agent(&broker, &["--exec", script]);
    let mut spec = job("thumbnail", "hello payload");
    spec.metadata.insert("trace-id".into(), "abc-123".into());
    let id = enqueue_one(&broker, spec).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    let expected =
        format!("stdin=hello payload\nid={id} kind=thumbnail queue={QUEUE} attempt=1 trace=abc-123 lease=set\n");
    assert_eq!(result_text(&done), expected);
    assert_eq!(done.attempt, 1);
    assert_eq!(done.last_error, "");
}

#[tokio::test]
async fn exec_result_is_bounded_by_max_output_bytes_and_the_command_is_not_blocked() {
    let broker = start_broker().await;
    // 1 MiB of output, far more than a pipe buffer: the agent must keep reading past the bound.
    let script = "head -c 1048576 /dev/zero | tr '\\0' a; echo done >&2";
    let _agent = agent(&broker, &["--exec", script, "--max-output-bytes", "1000"]);
    let id = enqueue_one(&broker, job("big", "")).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.result, vec![b'a'; 1000], "the first --max-output-bytes of stdout");
}

#[tokio::test]
async fn exec_retryable_failure_is_retried_and_the_retry_succeeds() {
    let broker = start_broker().await;
    let script = r#"if [ "$JOB_ATTEMPT" = 1 ]; then echo "flaky on attempt 1" >&2; exit 3; fi
echo "ok on attempt $JOB_ATTEMPT""#;
    let _agent = agent(&broker, &["--exec", script]);
    let id = enqueue_one(&broker, job("flaky", "")).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempt, 2, "the first attempt failed and was retried");
    assert_eq!(result_text(&done), "ok on attempt 2\n");
    assert_eq!(done.last_error, "flaky on attempt 1", "the first attempt's stderr is its error");
}

#[tokio::test]
async fn exec_exit_65_fails_for_good_with_the_stderr_tail_as_error() {
    let broker = start_broker().await;
    let script = r###"echo "##jobbroker:progress 5 starting" >&2
echo "reading input" >&2
echo "bad input: not a PNG" >&2
exit 65"###;
    let _agent = agent(&broker, &["--exec", script]);
    let mut spec = job("decode", "garbage");
    spec.max_attempts = 5;
    let id = enqueue_one(&broker, spec).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Failed, WAIT).await;
    assert_eq!(done.attempt, 1, "exit 65 is not retried although attempts are left");
    assert_eq!(done.last_error, "reading input\nbad input: not a PNG", "the stderr tail, without progress lines");
}

#[tokio::test]
async fn exec_timeout_kills_the_command_and_its_children_and_the_job_is_retried() {
    let broker = start_broker().await;
    let dir = tempfile::tempdir().expect("a scratch directory");
    let dir_path = dir.path().display();
    // Attempt 1 starts a child that would sleep for a minute, records both pids, and waits for it.
    let script = format!(
        r#"if [ "$JOB_ATTEMPT" = 1 ]; then
  sleep 60 &
  echo $! > "{dir_path}/child.tmp" && mv "{dir_path}/child.tmp" "{dir_path}/child"
  echo $$ > "{dir_path}/shell.tmp" && mv "{dir_path}/shell.tmp" "{dir_path}/shell"
  wait
fi
echo "attempt $JOB_ATTEMPT done""#
    );
    let _agent = agent(&broker, &["--exec", &script]);
    let mut spec = job("slow", "");
    spec.execution_timeout = Some(proto_duration(Duration::from_secs(2)));
    spec.max_attempts = 2;
    let id = enqueue_one(&broker, spec).await;

    let shell = read_pid(&dir.path().join("shell")).await;
    let child = read_pid(&dir.path().join("child")).await;
    assert!(process_alive(shell) && process_alive(child), "the command and its child run until the timeout");

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempt, 2, "the timed-out attempt was retried");
    assert_eq!(result_text(&done), "attempt 2 done\n");
    assert!(done.last_error.contains("execution timeout exceeded"), "timeout error recorded: {:?}", done.last_error);
    wait_for("the timed-out command and its child to be killed", Duration::from_secs(5), || async move {
        (!process_alive(shell) && !process_alive(child)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn exec_progress_lines_reach_get_job_while_the_command_runs() {
    let broker = start_broker().await;
    let dir = tempfile::tempdir().expect("a scratch directory");
    let go = dir.path().join("go");
    let script = format!(
        r###"echo "##jobbroker:progress 42 resizing tiles" >&2
while [ ! -e "{}" ]; do sleep 0.05; done
echo finished"###,
        go.display()
    );
    let _agent = agent(&broker, &["--exec", &script]);
    let id = enqueue_one(&broker, job("resize", "")).await;
    let client = broker.client().await;

    let running = wait_for_job(&client, &id, "progress 42 % while leased", WAIT, |job| {
        job.progress.as_ref().is_some_and(|p| p.percent == 42)
    })
    .await;
    assert_eq!(running.state(), JobState::Leased, "progress arrives while the command still runs");
    assert_eq!(running.progress.as_ref().map(|p| p.message.as_str()), Some("resizing tiles"));

    std::fs::write(&go, b"").expect("letting the command finish");
    let done = wait_for_state(&client, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "finished\n");
    assert_eq!(done.last_error, "", "progress lines are not error output");
}

// ---- http ----

#[tokio::test]
async fn http_2xx_succeeds_with_the_body_and_the_server_gets_the_payload_and_job_headers() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![Reply::status(201).body("created #7")]).await;
    let _agent = agent(&broker, &["--http", &server.url]);
    let mut spec = job("notify", b"\x00binary payload\xff".to_vec());
    spec.metadata.insert("tenant".into(), "acme".into());
    let id = enqueue_one(&broker, spec).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "created #7");
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.body, b"\x00binary payload\xff");
    assert_eq!(request.header("content-type"), Some("application/octet-stream"));
    assert_eq!(request.header("x-job-id"), Some(id.as_str()));
    assert_eq!(request.header("x-job-kind"), Some("notify"));
    assert_eq!(request.header("x-job-queue"), Some(QUEUE));
    assert_eq!(request.header("x-job-attempt"), Some("1"));
    assert!(request.header("x-job-lease-id").is_some_and(|lease| !lease.is_empty()), "{:?}", request.headers);
    assert_eq!(request.header("x-job-meta-tenant"), Some("acme"));
}

#[tokio::test]
async fn http_4xx_fails_for_good() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![
        Reply::status(400).body("bad field: email"),
        Reply::status(422).body("unprocessable order"),
    ])
    .await;
    let _agent = agent(&broker, &["--http", &server.url]);
    let client = broker.client().await;

    // One job at a time, so each meets its own scripted status.
    for (count, (status, body)) in [(400, "bad field: email"), (422, "unprocessable order")].into_iter().enumerate() {
        let mut spec = job("notify", "x");
        spec.max_attempts = 5;
        let id = enqueue_one(&broker, spec).await;
        let done = wait_for_state(&client, &id, JobState::Failed, WAIT).await;
        assert_eq!(done.attempt, 1, "HTTP {status} is not retried although attempts are left");
        assert!(
            done.last_error.contains(&status.to_string()) && done.last_error.contains(body),
            "the error names the status and the start of the body: {:?}",
            done.last_error
        );
        assert_eq!(server.requests().len(), count + 1, "one request per job");
    }
}

#[tokio::test]
async fn http_408_429_and_5xx_are_retried() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![
        Reply::status(408),
        Reply::status(429),
        Reply::status(500).body("oops"),
        Reply::status(503).body("down for maintenance"),
        Reply::ok("finally"),
    ])
    .await;
    let _agent = agent(&broker, &["--http", &server.url]);
    let mut spec = job("notify", "x");
    spec.max_attempts = 10;
    let id = enqueue_one(&broker, spec).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempt, 5, "408, 429, 500 and 503 were each retried");
    assert_eq!(result_text(&done), "finally");
    assert!(done.last_error.contains("503"), "the last failure is recorded: {:?}", done.last_error);
    let attempts: Vec<_> = server.requests().iter().map(|r| r.header("x-job-attempt").map(str::to_owned)).collect();
    let expected: Vec<_> = (1..=5).map(|n| Some(n.to_string())).collect();
    assert_eq!(attempts, expected);
}

#[tokio::test]
async fn http_retry_after_sets_when_the_job_runs_again() {
    let broker = start_broker().await;
    let server =
        TestServer::start(vec![Reply::status(503).header("Retry-After", "2").body("busy"), Reply::ok("done")]).await;
    let _agent = agent(&broker, &["--http", &server.url]);
    let id = enqueue_one(&broker, job("notify", "x")).await;
    let client = broker.client().await;

    let first = server.wait_for_requests(1, WAIT).await.remove(0);
    let waiting = wait_for_job(&client, &id, "queued again after the 503", WAIT, |job| {
        job.state() == JobState::Queued && job.last_error.contains("503")
    })
    .await;
    // Without Retry-After the job's own backoff (50 ms) would apply.
    let delay = time(waiting.run_at).duration_since(first.received_at).expect("run_at after the request");
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(4500)).contains(&delay),
        "run_at is about 2 s after the failed request, got {delay:?}"
    );

    let done = wait_for_state(&client, &id, JobState::Succeeded, WAIT).await;
    assert_eq!((done.attempt, result_text(&done).as_str()), (2, "done"));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].received_at.duration_since(first.received_at).expect("in order");
    assert!(gap >= Duration::from_millis(1900), "the retry waited for Retry-After, got {gap:?}");
}

#[tokio::test]
async fn http_timeout_is_retryable() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![Reply::ok("too late").delay(Duration::from_secs(30)), Reply::ok("fast")]).await;
    let _agent = agent(&broker, &["--http", &server.url, "--http-timeout", "500ms"]);
    let id = enqueue_one(&broker, job("notify", "x")).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Succeeded, WAIT).await;
    assert_eq!((done.attempt, result_text(&done).as_str()), (2, "fast"), "the timed-out call was retried");
    assert!(!done.last_error.is_empty(), "the timeout is recorded as the first attempt's error");
}

#[tokio::test]
async fn http_connect_error_is_retryable() {
    let broker = start_broker().await;
    let _agent = agent(&broker, &["--http", &closed_port_url().await]);
    let mut spec = job("notify", "x");
    spec.max_attempts = 3;
    let id = enqueue_one(&broker, spec).await;

    let done = wait_for_state(&broker.client().await, &id, JobState::Failed, WAIT).await;
    assert_eq!(done.attempt, 3, "each connect error was retried until the attempts ran out");
    assert!(done.last_error.contains("connect"), "the error says what failed: {:?}", done.last_error);
}

// ---- http_callback ----

#[tokio::test]
async fn http_callback_sends_string_data_raw_and_other_data_as_json() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![Reply::ok("got text"), Reply::ok("got json")]).await;
    let _agent = agent(&broker, &["--http-callback"]);
    let client = broker.client().await;

    let text = serde_json::json!({"url": format!("{}hooks/text", server.url), "data": "raw text"});
    let id = enqueue_one(&broker, job("webhook", text.to_string())).await;
    let done = wait_for_state(&client, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "got text");
    let request = server.requests().remove(0);
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/hooks/text"));
    assert_eq!(request.body, b"raw text", "a string is sent as it is, not as a JSON string");
    assert_eq!(request.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(request.header("x-job-id"), Some(id.as_str()));

    let data = serde_json::json!({"order": 17, "items": ["a", "b"], "paid": true});
    let object = serde_json::json!({"url": format!("{}hooks/json", server.url), "data": data});
    let id = enqueue_one(&broker, job("webhook", object.to_string())).await;
    let done = wait_for_state(&client, &id, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "got json");
    let request = server.requests().remove(1);
    assert_eq!(request.path, "/hooks/json");
    let sent: serde_json::Value = serde_json::from_slice(&request.body).expect("the body is JSON");
    assert_eq!(sent, data);
    assert_eq!(request.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn http_callback_with_a_payload_that_is_not_json_fails_for_good() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![]).await;
    let _agent = agent(&broker, &["--http-callback"]);
    let client = broker.client().await;

    let no_url = serde_json::json!({"data": "x", "target": server.url}).to_string();
    for (payload, problem) in [("not json at all", "not JSON"), (no_url.as_str(), "url")] {
        let mut spec = job("webhook", payload);
        spec.max_attempts = 5;
        let id = enqueue_one(&broker, spec).await;
        let done = wait_for_state(&client, &id, JobState::Failed, WAIT).await;
        assert_eq!(done.attempt, 1, "a bad payload is not retried");
        assert!(done.last_error.contains(problem), "the error names the problem: {:?}", done.last_error);
    }
    assert!(server.requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn http_callback_with_a_bad_url_says_what_is_wrong_without_echoing_the_url() {
    let broker = start_broker().await;
    let agent = agent(&broker, &["--http-callback"]);
    let client = broker.client().await;

    let cases = [
        ("ftp://deploy:s3cret-password@files.example/drop?sig=s3cret-signature", "the URL has scheme ftp"),
        ("http://deploy:s3cret-password@bad host/hook?sig=s3cret-signature", "not a valid URL"),
    ];
    for (url, problem) in cases {
        let mut spec = job("webhook", serde_json::json!({"url": url, "data": "x"}).to_string());
        spec.max_attempts = 5;
        let id = enqueue_one(&broker, spec).await;
        let done = wait_for_state(&client, &id, JobState::Failed, WAIT).await;
        assert_eq!(done.attempt, 1, "a bad URL is not retried");
        assert!(done.last_error.starts_with(&format!("payload.url: {problem}")), "{:?}", done.last_error);
        assert!(!done.last_error.contains("s3cret"), "the URL is not echoed: {:?}", done.last_error);
    }
    assert!(!agent.log().contains("s3cret"), "nor logged: {}", agent.log());
}

// ---- per-kind configuration ----

#[tokio::test]
async fn config_file_routes_each_kind_to_its_handler_and_fails_kinds_without_one() {
    let broker = start_broker().await;
    let server = TestServer::start(vec![Reply::ok("notified")]).await;
    let dir = tempfile::tempdir().expect("a scratch directory");
    let config = dir.path().join("agent.toml");
    let toml = format!(
        r#"queues = ["{QUEUE}"]
capacity = 2

[kinds.upper]
handler = "exec"
command = ["tr", "a-z", "A-Z"]

[kinds.greet]
handler = "exec"
shell = 'printf "%s, %s" "$GREETING" "$(cat)"'
env = {{ GREETING = "hello" }}

[kinds.notify]
handler = "http"
url = "{url}"
headers = {{ Authorization = "Bearer t0ken" }}
"#,
        url = server.url
    );
    std::fs::write(&config, toml).expect("writing the config file");
    // No --queue and no default handler: both come from the file (which has no [default]).
    let _agent = spawn_agent(&broker.url, &["--config", config.to_str().expect("a UTF-8 path")], &[]);
    let client = broker.client().await;

    let upper = enqueue_one(&broker, job("upper", "shout")).await;
    let greet = enqueue_one(&broker, job("greet", "world")).await;
    let notify = enqueue_one(&broker, job("notify", "ping")).await;
    let mut unknown = job("unknown", "?");
    unknown.max_attempts = 5;
    let unknown = enqueue_one(&broker, unknown).await;

    let done = wait_for_state(&client, &upper, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "SHOUT", "argv command, payload on stdin");
    let done = wait_for_state(&client, &greet, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "hello, world", "shell command with the configured env");
    let done = wait_for_state(&client, &notify, JobState::Succeeded, WAIT).await;
    assert_eq!(result_text(&done), "notified");
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "only the http kind calls the server");
    assert_eq!(requests[0].body, b"ping");
    assert_eq!(requests[0].header("authorization"), Some("Bearer t0ken"), "configured headers are sent");
    assert_eq!(requests[0].header("x-job-kind"), Some("notify"));

    let done = wait_for_state(&client, &unknown, JobState::Failed, WAIT).await;
    assert_eq!(done.attempt, 1, "a kind without handler is not retried");
    assert_eq!(done.last_error, "no handler for kind unknown");
}
