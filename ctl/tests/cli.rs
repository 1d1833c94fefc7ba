//! The real `jobctl` binary against a live broker (in-process, own database per test), for every example of
//! README's "Operating a broker" section: the tests mirror the doc's `jobctl` commands in its order (queue `emails`, worker
//! `reporting-1`), and check both the tables and the `--json` documents, and the exit codes.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{TestBroker, wait_for};

/// The value of `name` in a `get` listing (`name   value` lines).
fn field(listing: &str, name: &str) -> String {
    let value = listing.lines().find_map(|line| line.strip_prefix(name).filter(|rest| rest.starts_with("  ")));
    value.unwrap_or_else(|| panic!("no {name:?} line in:\n{listing}")).trim().to_owned()
}

/// The whitespace-separated cells of the table row that starts with `first`.
fn row(table: &str, first: &str) -> Vec<String> {
    let line = table.lines().find(|line| line.split_whitespace().next() == Some(first));
    let line = line.unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"));
    line.split_whitespace().map(str::to_owned).collect()
}

async fn enqueue(broker: &TestBroker, args: &[&str]) -> String {
    let answer = broker.jobctl(&[&["--json", "enqueue"], args].concat()).await.json();
    assert_eq!(answer["created"], true, "{answer}");
    answer["id"].as_str().expect("an id").to_owned()
}

#[tokio::test]
async fn enqueue_get_watch_and_cancel() {
    let broker = TestBroker::start().await;
    let args = ["emails", "send", "--payload", "hello", "--priority", "5", "--idempotency-key", "welcome-42"];
    let id = enqueue(&broker, &args).await;
    let again = broker.jobctl(&[&["enqueue"], &args[..]].concat()).await.ok();
    assert_eq!(again, format!("job {id} already exists with that idempotency key\n"));

    let listing = broker.jobctl(&["get", &id]).await.ok();
    assert_eq!(field(&listing, "state"), "QUEUED");
    assert_eq!(field(&listing, "payload"), "hello");
    assert_eq!(field(&listing, "idempotency key"), "welcome-42");
    let job = broker.jobctl(&["get", &id, "--json"]).await.json();
    assert_eq!((&job["queue"], &job["kind"], &job["priority"]), (&json!("emails"), &json!("send"), &json!(5)));
    assert_eq!((&job["payload"], &job["attempt"]), (&json!("hello"), &json!(0)));
    assert!(job["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "RFC 3339 in UTC: {job}");

    let worker = broker.worker("reporting-1", &["emails"]);
    let watched = broker.jobctl(&["watch", &id]).await.ok();
    let last = watched.lines().last().expect("at least one line");
    assert!(last.contains("SUCCEEDED") && last.contains("attempt 1/"), "{watched}");
    let job = broker.jobctl(&["--json", "get", &id]).await.json();
    assert_eq!(
        (&job["state"], &job["result"], &job["worker_id"]),
        (&json!("SUCCEEDED"), &json!("HELLO"), &json!("reporting-1"))
    );

    // The worker fails jobs whose payload starts with "fail": watch exits 3 and says why.
    let failing = enqueue(&broker, &["emails", "send", "--payload", "fail please"]).await;
    let stderr = broker.jobctl(&["watch", &failing]).await.fails_with(3);
    assert_eq!(stderr, format!("jobctl: job {failing} ended FAILED: told to fail\n"));
    worker.stop().await;

    let held = enqueue(&broker, &["emails", "send", "--delay", "1h"]).await;
    let listing = broker.jobctl(&["cancel", &held]).await.ok();
    assert_eq!(field(&listing, "state"), "CANCELLED");
    let watched = broker.jobctl(&["--json", "watch", &held]).await;
    watched.fails_with(3);
    let updates: Vec<Value> = watched.stdout().lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    assert_eq!(updates.last().map(|job| &job["state"]), Some(&json!("CANCELLED")));
}

#[tokio::test]
async fn pause_holds_jobs_until_resume() {
    let broker = TestBroker::start().await;
    let _worker = broker.worker("reporting-1", &["emails", "reports"]);
    let paused = broker.jobctl(&["--json", "pause", "emails"]).await.json();
    assert_eq!(paused["paused"], true);

    let held = enqueue(&broker, &["emails", "send"]).await;
    // A job enqueued after it on a queue the same worker takes is run: the worker was there to take the first.
    let probe = enqueue(&broker, &["reports", "build"]).await;
    broker.jobctl(&["watch", &probe]).await.ok();
    let job = broker.jobctl(&["--json", "get", &held]).await.json();
    assert_eq!((&job["state"], &job["attempt"]), (&json!("QUEUED"), &json!(0)));
    let stats = broker.jobctl(&["stats", "emails"]).await.ok();
    assert_eq!(row(&stats, "emails")[8], "yes", "PAUSED column:\n{stats}");

    // (The worker may take the job before the answer's stats are read, so they say nothing about it.)
    let resumed = broker.jobctl(&["--json", "resume", "emails"]).await.json();
    assert_eq!(resumed["paused"], false);
    broker.jobctl(&["watch", &held]).await.ok();
}

#[tokio::test]
async fn stats_queues_and_jobs_as_tables_and_json() {
    let broker = TestBroker::start().await;
    let first = enqueue(&broker, &["emails", "send"]).await;
    enqueue(&broker, &["emails", "send"]).await;
    enqueue(&broker, &["emails", "send", "--delay", "1h"]).await;
    enqueue(&broker, &["reports", "build"]).await;
    broker.jobctl(&["cancel", &first]).await.ok();

    let stats = broker.jobctl(&["--json", "stats", "emails"]).await.json();
    let counts = ["queued", "scheduled", "leased", "succeeded", "failed", "cancelled"].map(|k| stats[k].clone());
    assert_eq!(counts, [1, 1, 0, 0, 0, 1].map(|n| json!(n)), "{stats}");
    assert_eq!((&stats["paused"], &stats["max_depth"]), (&json!(false), &json!(0)));
    assert!(stats["oldest_queued_age"].as_str().is_some_and(|age| age.ends_with('s')), "{stats}");
    let table = broker.jobctl(&["stats", "emails"]).await.ok();
    assert_eq!(row(&table, "QUEUE")[..4], ["QUEUE", "QUEUED", "SCHEDULED", "LEASED"]);
    assert_eq!(row(&table, "emails")[1..7], ["1", "1", "0", "0", "0", "1"]);

    let queues = broker.jobctl(&["--json", "queues"]).await.json();
    let names: Vec<_> = queues["queues"].as_array().expect("queues").iter().map(|q| q["queue"].clone()).collect();
    assert_eq!(names, [json!("emails"), json!("reports")]);
    let table = broker.jobctl(&["queues"]).await.ok();
    assert_eq!(row(&table, "reports")[1], "1", "{table}");

    let page = broker.jobctl(&["--json", "jobs", "emails", "--limit", "2"]).await.json();
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(2));
    let token = page["next_page_token"].as_str().expect("a token").to_owned();
    assert!(!token.is_empty(), "{page}");
    let rest = broker.jobctl(&["--json", "jobs", "emails", "--limit", "2", "--page-token", &token]).await.json();
    assert_eq!(rest["jobs"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest["next_page_token"], "");
    let human = broker.jobctl(&["jobs", "emails", "--limit", "2"]).await;
    assert_eq!(human.ok().lines().count(), 3, "a header and two jobs");
    assert!(human.stderr().contains(&format!("--page-token {token}")), "{}", human.stderr());
    let cancelled = broker.jobctl(&["jobs", "emails", "--state", "cancelled"]).await.ok();
    assert_eq!(row(&cancelled, &first)[1], "CANCELLED");
    assert_eq!(cancelled.lines().count(), 2, "{cancelled}");
}

#[tokio::test]
async fn retry_retry_all_and_purge_after_failures() {
    let broker = TestBroker::start().await;
    let worker = broker.worker("reporting-1", &["emails"]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&broker, &["emails", "send", "--payload", "fail", "--max-attempts", "1"]).await);
    }
    for id in &ids {
        broker.jobctl(&["watch", id]).await.fails_with(3);
    }
    worker.stop().await;
    assert_eq!(broker.jobctl(&["--json", "stats", "emails"]).await.json()["failed"], 3);

    let job = broker.jobctl(&["--json", "retry", &ids[0]]).await.json();
    assert_eq!((&job["state"], &job["attempt"]), (&json!("QUEUED"), &json!(0)));
    assert_eq!(broker.jobctl(&["retry-all", "emails"]).await.ok(), "retried 2 jobs of emails\n");
    let stats = broker.jobctl(&["--json", "stats", "emails"]).await.json();
    assert_eq!((&stats["queued"], &stats["failed"]), (&json!(3), &json!(0)));

    for id in &ids {
        broker.jobctl(&["cancel", id]).await.ok();
    }
    let retried = broker.jobctl(&["--json", "retry-all", "emails", "--state", "cancelled"]).await.json();
    assert_eq!(retried["retried"], 3);
    for id in &ids {
        broker.jobctl(&["cancel", id]).await.ok();
    }
    assert_eq!(broker.jobctl(&["--json", "purge", "emails", "--state", "succeeded"]).await.json()["purged"], 0);
    assert_eq!(broker.jobctl(&["purge", "emails"]).await.ok(), "purged 3 jobs of emails\n");
    let stderr = broker.jobctl(&["get", &ids[0]]).await.fails_with(1);
    assert!(stderr.starts_with("jobctl: NOT_FOUND: "), "{stderr}");
}

#[tokio::test]
async fn max_depth_refuses_enqueues_beyond_it() {
    let broker = TestBroker::start().await;
    assert_eq!(broker.jobctl(&["--json", "max-depth", "emails", "1"]).await.json()["max_depth"], 1);
    let table = broker.jobctl(&["stats", "emails"]).await.ok();
    assert_eq!(row(&table, "emails")[9], "1", "MAX DEPTH column:\n{table}");
    enqueue(&broker, &["emails", "send"]).await;
    let stderr = broker.jobctl(&["enqueue", "emails", "send"]).await.fails_with(1);
    assert!(stderr.starts_with("jobctl: RESOURCE_EXHAUSTED: "), "{stderr}");
    broker.jobctl(&["max-depth", "emails", "0"]).await.ok();
    enqueue(&broker, &["emails", "send"]).await;
}

#[tokio::test]
async fn workers_lists_a_connected_worker() {
    let broker = TestBroker::start().await;
    let _worker = broker.worker("reporting-1", &["emails", "reports"]);
    let listed = wait_for("the worker in jobctl workers", Duration::from_secs(20), || async {
        let answer = broker.jobctl(&["--json", "workers", "--queue", "emails"]).await.json();
        answer["workers"].as_array().and_then(|workers| workers.first().cloned())
    })
    .await;
    assert_eq!((&listed["worker_id"], &listed["capacity"]), (&json!("reporting-1"), &json!(4)));
    assert_eq!((&listed["queues"], &listed["labels"]), (&json!(["emails", "reports"]), &json!({"team": "ops"})));
    let table = broker.jobctl(&["workers"]).await.ok();
    assert_eq!(row(&table, "reporting-1")[1..3], ["emails,reports", "0/4"], "{table}");
    let others = broker.jobctl(&["--json", "workers", "--queue", "billing"]).await.json();
    assert_eq!(others["workers"], json!([]));
}

#[tokio::test]
async fn bad_input_fails_naming_the_problem() {
    let broker = TestBroker::start().await;
    let stderr = broker.jobctl(&["enqueue", "no spaces", "send", "--priority", "5000"]).await.fails_with(1);
    assert!(stderr.starts_with("jobctl: INVALID_ARGUMENT: "), "{stderr}");
    assert!(stderr.contains("\n  jobs[0].queue: ") && stderr.contains("\n  jobs[0].priority: "), "{stderr}");
    let stderr = broker.jobctl(&["get", "not-a-job-id"]).await.fails_with(1);
    assert!(stderr.starts_with("jobctl: INVALID_ARGUMENT: ") && stderr.contains("\n  id: "), "{stderr}");
    let stderr = broker.jobctl(&["stats", "no spaces"]).await.fails_with(1);
    assert!(stderr.contains("\n  queue: "), "{stderr}");

    // Refused before anything is sent.
    let stderr = broker.jobctl(&["jobs", "emails", "--state", "lost"]).await.fails_with(2);
    assert!(stderr.contains("invalid value 'lost' for '--state <STATE>'"), "{stderr}");
    let stderr = broker.jobctl(&["enqueue", "emails", "send", "--payload-file", "/nonexistent"]).await.fails_with(1);
    assert!(stderr.starts_with("jobctl: --payload-file /nonexistent: "), "{stderr}");
    let stderr = broker.jobctl(&["--addr", "http://127.0.0.1:1", "queues"]).await.fails_with(1);
    assert!(stderr.starts_with("jobctl: cannot connect to http://127.0.0.1:1: "), "{stderr}");
}

#[tokio::test]
async fn health_and_smoke() {
    let broker = TestBroker::start().await;
    // NOT_SERVING (exit 1) until the broker has reached its database.
    let table = broker.ready().await;
    assert_eq!(row(&table, "(server)"), ["(server)", "SERVING"]);
    let services = ["--service", "jobbroker.v1.BrokerService", "--service", "jobbroker.v1.AdminService"];
    let answer = broker.jobctl(&[&["--json", "health"], &services[..]].concat()).await.json();
    let statuses: Vec<_> =
        answer["services"].as_array().expect("services").iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, [json!("SERVING"), json!("SERVING")]);
    let unknown = broker.jobctl(&["health", "--service", "no.such.Service"]).await;
    assert_eq!(unknown.fails_with(1), "jobctl: not healthy: \"no.such.Service\" is SERVICE_UNKNOWN\n");

    let smoke = broker.jobctl(&["smoke"]).await.ok();
    assert!(smoke.lines().last().is_some_and(|line| line.starts_with("smoke test passed in ")), "{smoke}");
    let summary = broker.jobctl(&["--json", "smoke", "--queue", "smoke-2"]).await.json();
    assert_eq!((&summary["passed"], &summary["queue"]), (&json!(true), &json!("smoke-2")));
    let job = broker.jobctl(&["--json", "get", summary["job_id"].as_str().expect("a job id")]).await.json();
    assert_eq!(
        (&job["state"], &job["kind"], &job["result"]),
        (&json!("SUCCEEDED"), &json!("jobbroker.smoke"), &json!("ok"))
    );
}

#[tokio::test]
async fn smoke_releases_other_jobs_and_fails_clearly_when_nothing_is_handed_out() {
    let broker = TestBroker::start().await;
    broker.jobctl(&["pause", "jobbroker-smoke"]).await.ok();
    let run = broker.jobctl(&["smoke", "--timeout", "1s"]).await;
    let stderr = run.fails_with(1);
    assert!(stderr.starts_with("jobctl: smoke test timed out after 1s waiting for the assignment of job "), "{stderr}");
    // The job it left is cancelled, so a later run is not held up by it.
    let stats = broker.jobctl(&["--json", "stats", "jobbroker-smoke"]).await.json();
    assert_eq!((&stats["queued"], &stats["cancelled"]), (&json!(0), &json!(1)));

    // A job of someone else's on the smoke queue, handed out first, is given back unrun.
    broker.jobctl(&["resume", "jobbroker-smoke"]).await.ok();
    let other = enqueue(&broker, &["jobbroker-smoke", "other", "--priority", "1000"]).await;
    let smoke = broker.jobctl(&["smoke"]).await.ok();
    assert!(smoke.contains(&format!("released job {other}, left on jobbroker-smoke by an earlier run")), "{smoke}");
    let job = broker.jobctl(&["--json", "get", &other]).await.json();
    assert_eq!((&job["state"], &job["attempt"]), (&json!("QUEUED"), &json!(0)));
}
