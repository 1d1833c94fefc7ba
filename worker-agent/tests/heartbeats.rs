//! Heartbeats a broker refuses as invalid: a progress message over its `--max-progress-message-bytes`, more leases
//! than its `--max-leases-per-heartbeat`. The agent (through `jobbroker::worker`) sends them again without progress,
//! then in smaller slices, so every job keeps its lease and runs once.
//!
//! Each job is a command that runs for several lease TTLs (2 s, [`fast_settings`]): it finishes on its first
//! attempt only if its lease was heartbeated all along.

mod support;

use std::time::Duration;

use broker::config::Limits;
use jobbroker::v1::{self as pb, JobState};
use support::*;

const QUEUE: &str = "beats";
/// Long enough for a job to run 2.5 lease TTLs and finish.
const WAIT: Duration = Duration::from_secs(30);
/// Reports its payload as progress, then runs 2.5 lease TTLs.
const SCRIPT: &str = r###"echo "##jobbroker:progress 10 $(cat)" >&2; sleep 5; echo done"###;
/// What the worker loop logs when it drops the progress, and when it sends fewer leases per call.
const WITHOUT_PROGRESS: &str = "sending it again without progress";
const FEWER: &str = "sending fewer per call";

/// A broker with fast timings and `limits` changed, and an agent running [`SCRIPT`] for up to `capacity` jobs.
async fn broker_and_agent(limits: impl FnOnce(&mut Limits), capacity: u32) -> (TestBroker, Agent) {
    let mut settings = fast_settings(test_database().await);
    limits(&mut settings.limits);
    let broker = TestBroker::start(settings).await;
    let capacity = capacity.to_string();
    let agent = spawn_agent(&broker.url, &["--queue", QUEUE, "--capacity", &capacity, "--exec", SCRIPT], &[]);
    (broker, agent)
}

/// Enqueues one job per payload, waits for each to finish, and asserts that each succeeded on its first attempt.
async fn assert_each_runs_once(broker: &TestBroker, payloads: &[&str]) {
    let mut client = broker.client().await;
    let specs = payloads.iter().map(|payload| pb::JobSpec::new(QUEUE, "long", payload.as_bytes())).collect();
    for id in enqueue(&mut client, specs).await {
        let ended_or_retried = |job: &pb::Job| is_terminal(job.state()) || job.attempt > 1;
        let job = wait_for_job(&client, &id, "the job to end", WAIT, ended_or_retried).await;
        assert_eq!(
            (job.state(), job.attempt, job.result.as_slice()),
            (JobState::Succeeded, 1, b"done\n".as_slice()),
            "job {id} kept its lease until it finished: {job:#?}"
        );
    }
}

#[tokio::test]
async fn a_progress_message_the_broker_refuses_costs_no_lease() {
    let (broker, agent) = broker_and_agent(|limits| limits.max_progress_message_bytes = 16, 2).await;

    assert_each_runs_once(&broker, &["short", "a message far longer than the broker's sixteen bytes"]).await;
    let log = agent.log();
    assert!(log.contains(WITHOUT_PROGRESS) && log.contains("progress.message"), "the warning names the field: {log}");
    // The jobs ran for several heartbeat periods; the refused progress was sent once, not again every period.
    assert_eq!(log.matches(WITHOUT_PROGRESS).count(), 1, "the refused progress was dropped: {log}");
}

#[tokio::test]
async fn more_running_jobs_than_one_heartbeat_may_name_keep_their_leases() {
    let (broker, agent) = broker_and_agent(|limits| limits.max_leases_per_heartbeat = 2, 5).await;

    assert_each_runs_once(&broker, &["one", "two", "three", "four", "five"]).await;
    assert!(agent.log().contains(FEWER), "the agent says it sends fewer leases per call: {}", agent.log());
}
