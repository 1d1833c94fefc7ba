//! Bad input over real gRPC: every field SPEC limits is refused with INVALID_ARGUMENT naming the field in
//! google.rpc.BadRequest details, and nothing is stored. Values at the limits are accepted, and the limits are
//! settings. Unknown ids are NOT_FOUND; a well-formed lease that is not current is ABORTED.

mod common;

use std::{collections::HashMap, fmt::Debug, time::Duration};

use broker::config::Settings;
use common::{TestBroker, test_database, worker::*};
use jobbroker::v1::{
    self as pb, admin_service_client::AdminServiceClient, broker_service_client::BrokerServiceClient, lease_request,
};
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

const MIB: usize = 1 << 20;
const DAY: i64 = 24 * 3600;
const ARRIVES: Duration = Duration::from_secs(5);

/// A valid job, with `change` applied.
fn spec(change: impl FnOnce(&mut pb::JobSpec)) -> pb::JobSpec {
    let mut spec = pb::JobSpec::new("valid", "work", b"payload".to_vec());
    change(&mut spec);
    spec
}

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn metadata(entries: usize) -> HashMap<String, String> {
    (0..entries).map(|i| (format!("k{i}"), "v".to_string())).collect()
}

/// Asserts INVALID_ARGUMENT whose BadRequest details name exactly `field`.
fn assert_invalid<T: Debug>(result: Result<T, Status>, field: &str) {
    let status = result.expect_err(&format!("{field}: refused"));
    assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    let details = status.get_error_details();
    let fields: Vec<&str> = details
        .bad_request()
        .unwrap_or_else(|| panic!("{field}: no BadRequest details in {status:?}"))
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, [field], "the violation names the field");
}

async fn count(database: &str, table: &str) -> i64 {
    let mut conn = PgConnection::connect(database).await.expect("connecting to the test database");
    let sql = format!("SELECT count(*) FROM {table}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await.expect("counting rows")
}

async fn enqueue_all(
    client: &mut BrokerServiceClient<Channel>,
    jobs: Vec<pb::JobSpec>,
) -> Result<pb::EnqueueResponse, Status> {
    Ok(client.enqueue(pb::EnqueueRequest { jobs }).await?.into_inner())
}

#[tokio::test]
async fn enqueue_refuses_every_field_out_of_its_limits_and_stores_nothing() {
    let database = test_database().await;
    let broker = TestBroker::start(Settings::with_database(&database)).await;
    let mut client = broker.client().await;

    let valid = || spec(|s| s.idempotency_key = "first".into());
    let mut cases: Vec<(String, Vec<pb::JobSpec>)> = vec![
        ("jobs".into(), vec![]),
        ("jobs".into(), (0..1001).map(|_| pb::JobSpec::new("valid", "work", vec![])).collect()),
    ];
    // The bad job comes second, after a valid one that must not be stored either.
    let mut bad = |field: &str, job: pb::JobSpec| cases.push((format!("jobs[1].{field}"), vec![valid(), job]));
    let long = "q".repeat(129);
    for name in ["", &long, "has space", "a/b", "é", "tab\t"] {
        bad("queue", spec(|s| s.queue = name.into()));
        bad("kind", spec(|s| s.kind = name.into()));
    }
    bad("payload", spec(|s| s.payload = vec![7; MIB + 1]));
    bad("metadata", spec(|s| s.metadata = metadata(65)));
    bad("max_attempts", spec(|s| s.max_attempts = 1001));
    bad("priority", spec(|s| s.priority = 1001));
    bad("priority", spec(|s| s.priority = -1001));
    bad("run_at", spec(|s| s.run_at = Some(prost_types::Timestamp { seconds: 0, nanos: -1 })));
    bad("idempotency_key", spec(|s| s.idempotency_key = "k".repeat(257)));
    // Years Postgres cannot store (or no one means), and NUL, which Postgres text and jsonb cannot hold.
    let year_10000 = 253_402_300_800;
    bad("run_at", spec(|s| s.run_at = Some(prost_types::Timestamp { seconds: year_10000, nanos: 0 })));
    bad("run_at", spec(|s| s.run_at = Some(prost_types::Timestamp { seconds: -200_000 * 365 * DAY, nanos: 0 })));
    bad("idempotency_key", spec(|s| s.idempotency_key = "a\0b".into()));
    bad("metadata[k\0]", spec(|s| s.metadata = HashMap::from([("k\0".into(), "v".into())])));
    bad("metadata[k]", spec(|s| s.metadata = HashMap::from([("k".into(), "v\0".into())])));
    let out_of_range = [secs(0), secs(-1), Some(prost_types::Duration { seconds: 0, nanos: -5 }), secs(30 * DAY + 1)];
    for duration in out_of_range {
        let retry = |policy: pb::RetryPolicy| spec(|s| s.retry = Some(policy));
        bad("lease_ttl", spec(|s| s.lease_ttl = duration));
        bad("execution_timeout", spec(|s| s.execution_timeout = duration));
        bad("retry.initial_backoff", retry(pb::RetryPolicy { initial_backoff: duration, ..Default::default() }));
        bad("retry.max_backoff", retry(pb::RetryPolicy { max_backoff: duration, ..Default::default() }));
    }
    for multiplier in [0.5, 100.5, -2.0, f64::NAN, f64::INFINITY] {
        bad("retry.multiplier", spec(|s| s.retry = Some(pb::RetryPolicy { multiplier, ..Default::default() })));
    }

    for (field, jobs) in cases {
        assert_invalid(enqueue_all(&mut client, jobs).await, &field);
    }
    assert_eq!(count(&database, "jobs").await, 0, "no refused request stored a job");
    assert_eq!(count(&database, "idempotency_keys").await, 0, "no refused request took a key");
    broker.stop().await;
}

#[tokio::test]
async fn values_at_the_limits_are_accepted() {
    let database = test_database().await;
    let broker = TestBroker::start(Settings::with_database(&database)).await;
    let mut client = broker.client().await;
    let name = "aZ09_.:-".repeat(16);
    assert_eq!(name.len(), 128);
    let jobs = vec![
        spec(|s| {
            (s.queue, s.kind, s.payload) = (name.clone(), name.clone(), vec![7; MIB]);
            (s.metadata, s.max_attempts, s.priority) = (metadata(64), 1000, 1000);
            (s.lease_ttl, s.execution_timeout) = (secs(30 * DAY), secs(30 * DAY));
            s.retry = Some(pb::RetryPolicy {
                initial_backoff: secs(30 * DAY),
                max_backoff: secs(30 * DAY),
                multiplier: 100.0,
            });
            s.idempotency_key = "k".repeat(256);
            s.run_at = Some(prost_types::Timestamp { seconds: 253_402_300_799, nanos: 999_999_999 });
        }),
        spec(|s| {
            let millisecond = Some(prost_types::Duration { seconds: 0, nanos: 1_000_000 });
            (s.queue, s.kind, s.max_attempts, s.priority) = ("q".into(), "k".into(), 1, -1000);
            (s.lease_ttl, s.execution_timeout) = (millisecond, millisecond);
            s.retry = Some(pb::RetryPolicy { initial_backoff: millisecond, max_backoff: millisecond, multiplier: 1.0 });
        }),
    ];
    let answer = enqueue_all(&mut client, jobs).await.expect("values at the limits are valid");
    assert!(answer.jobs.iter().all(|j| j.created));
    assert_eq!(count(&database, "jobs").await, 2);
    broker.stop().await;
}

/// Opens a Lease stream whose first messages are `first`; the sender keeps it open.
async fn raw_lease(
    client: &mut BrokerServiceClient<Channel>,
    first: Vec<lease_request::Request>,
) -> (mpsc::Sender<pb::LeaseRequest>, Result<tonic::Streaming<pb::LeaseResponse>, Status>) {
    let (send, receive) = mpsc::channel(8);
    for request in first {
        send.send(pb::LeaseRequest { request: Some(request) }).await.expect("the channel is open");
    }
    let opened = client.lease(ReceiverStream::new(receive)).await.map(|r| r.into_inner());
    (send, opened)
}

#[tokio::test]
async fn lease_streams_refuse_bad_registrations_and_protocol_errors() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    let ids = enqueue(&mut client, vec![pb::JobSpec::new("reg", "work", b"bait".to_vec())]).await;
    let register = |change: fn(&mut pb::Register)| {
        let mut register =
            pb::Register { worker_id: "w".into(), queues: vec!["reg".into()], capacity: 1, ..Default::default() };
        change(&mut register);
        register
    };

    // The first message must be register.
    let capacity_first = lease_request::Request::Capacity(pb::SetCapacity { capacity: 1 });
    assert_invalid(raw_lease(&mut client, vec![capacity_first]).await.1, "register");
    let (closed, receive) = mpsc::channel::<pb::LeaseRequest>(1);
    drop(closed);
    assert_invalid(client.lease(ReceiverStream::new(receive)).await, "register");

    type Change = fn(&mut pb::Register);
    let cases: [(&str, Change); 9] = [
        ("register.worker_id", |r| r.worker_id = "w\0".into()),
        ("register.labels[k\0]", |r| r.labels = HashMap::from([("k\0".into(), "v".into())])),
        ("register.labels[k]", |r| r.labels = HashMap::from([("k".into(), "\0".into())])),
        ("register.queues[0]", |r| r.queues = vec!["bad queue".into()]),
        ("register.queues[1]", |r| r.queues = vec!["reg".into(), "a/b".into()]),
        ("register.queues", |r| r.queues = vec![]),
        ("register.capacity", |r| r.capacity = 10_001),
        ("register.worker_id", |r| r.worker_id = String::new()),
        ("register.held_lease_ids[0]", |r| r.held_lease_ids = vec!["not-a-uuid".into()]),
    ];
    for (field, change) in cases {
        assert_invalid(TestWorker::register(client.clone(), register(change)).await.map(|_| ()), field);
    }

    // Protocol errors on an open stream end it, naming what was wrong.
    let twice = lease_request::Request::Register(register(|r| r.queues = vec!["twice".into()]));
    let (_open, stream) = raw_lease(&mut client, vec![twice.clone(), twice]).await;
    let mut stream = stream.expect("the first register is accepted");
    let ended = loop {
        match tokio::time::timeout(ARRIVES, stream.message()).await.expect("the stream ends") {
            Ok(Some(_assignment)) => continue,
            other => break other,
        }
    };
    assert_invalid(ended, "register");
    let mut worker = TestWorker::connect(client.clone(), "w2", &["other"], 1).await;
    worker.set_capacity(10_001).await;
    let ended = worker.next_message(ARRIVES).await.expect("the stream ends with an error");
    assert_invalid(ended, "capacity.capacity");

    // No refused registration took the bait: its first lease goes to the first valid worker on its queue.
    let mut worker = TestWorker::connect(client.clone(), "w3", &["reg"], 1).await;
    let job = worker.assignment(ARRIVES).await.job.expect("job");
    assert_eq!((job.id.as_str(), job.attempt), (ids[0].as_str(), 1), "the bait was never leased before");
    broker.stop().await;
}

#[tokio::test]
async fn heartbeat_and_complete_refuse_bad_input_and_leave_the_lease_alone() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    let ids = enqueue(&mut client, vec![pb::JobSpec::new("work", "work", b"p".to_vec())]).await;
    let mut worker = TestWorker::connect(client.clone(), "w1", &["work"], 1).await;
    let lease = worker.assignment(ARRIVES).await.lease_id;
    let before = get_job(&mut client, &ids[0]).await;

    let beat = |lease_id: &str, percent: u32, message: String| pb::LeaseBeat {
        lease_id: lease_id.into(),
        progress: Some(pb::Progress { percent, message }),
    };
    let heartbeats = [
        ("leases", vec![]),
        ("leases[0].lease_id", vec![beat("not-a-uuid", 1, String::new())]),
        ("leases[1].lease_id", vec![beat(&lease, 1, String::new()), beat("", 1, String::new())]),
        ("leases[0].progress.percent", vec![beat(&lease, 101, String::new())]),
        ("leases[0].progress.message", vec![beat(&lease, 1, "m".repeat(1025))]),
        ("leases[0].progress.message", vec![beat(&lease, 1, "half\0way".into())]),
    ];
    for (field, leases) in heartbeats {
        assert_invalid(client.heartbeat(pb::HeartbeatRequest { leases }).await, field);
    }

    let complete = |lease_id: &str, outcome: Option<pb::complete_request::Outcome>| pb::CompleteRequest {
        lease_id: lease_id.into(),
        outcome,
    };
    let too_late = Some(pb::complete_request::Outcome::Failure(pb::Failure {
        message: "boom".into(),
        non_retryable: false,
        retry_after: secs(30 * DAY + 1),
    }));
    let right_now =
        Some(pb::complete_request::Outcome::Failure(pb::Failure { retry_after: secs(0), ..Default::default() }));
    let completions = [
        ("lease_id", complete("not-a-uuid", Some(success(b"r")))),
        ("lease_id", complete("", Some(success(b"r")))),
        ("outcome", complete(&lease, None)),
        ("success.result", complete(&lease, Some(success(&vec![7; MIB + 1])))),
        ("failure.retry_after", complete(&lease, too_late)),
        ("failure.retry_after", complete(&lease, right_now)),
    ];
    for (field, request) in completions {
        assert_invalid(client.complete(request).await, field);
    }

    let after = get_job(&mut client, &ids[0]).await;
    assert_eq!(after.state(), pb::JobState::Leased, "refused calls changed nothing");
    assert_eq!((after.attempt, &after.progress, &after.result), (1, &None, &vec![]));
    assert_eq!(after.lease_expires_at, before.lease_expires_at, "refused heartbeats extended nothing");
    assert_eq!(worker.succeed(&lease, b"done").await.expect("the lease still holds"), pb::JobState::Succeeded);
    broker.stop().await;
}

#[tokio::test]
async fn a_failure_message_with_nul_is_recorded_with_the_nul_replaced() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    let job = spec(|s| (s.queue, s.max_attempts) = ("nul".into(), 1));
    let ids = enqueue(&mut client, vec![job]).await;
    let mut worker = TestWorker::connect(client.clone(), "w1", &["nul"], 1).await;
    let lease = worker.assignment(ARRIVES).await.lease_id;
    let failure = pb::Failure { message: "stderr\0tail".into(), ..Default::default() };
    let request =
        pb::CompleteRequest { lease_id: lease, outcome: Some(pb::complete_request::Outcome::Failure(failure)) };
    let answer = client.complete(request).await.expect("a failure is always recorded").into_inner();
    assert_eq!(answer.state(), pb::JobState::Failed);
    assert_eq!(get_job(&mut client, &ids[0]).await.last_error, "stderr\u{FFFD}tail");
    broker.stop().await;
}

#[tokio::test]
async fn unknown_ids_are_not_found_malformed_ids_invalid_and_stale_leases_aborted() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut client = broker.client().await;
    for id in ["not-a-uuid", "", "01234567-89ab-cdef-0123-456789abcdeg"] {
        let id = id.to_string();
        assert_invalid(client.get_job(pb::GetJobRequest { id: id.clone() }).await, "id");
        assert_invalid(client.watch_job(pb::WatchJobRequest { id: id.clone() }).await.map(|_| ()), "id");
        assert_invalid(client.cancel_job(pb::CancelJobRequest { id }).await, "id");
    }
    let unknown = Uuid::new_v4().to_string();
    let codes = [
        client.get_job(pb::GetJobRequest { id: unknown.clone() }).await.map(|_| ()),
        client.watch_job(pb::WatchJobRequest { id: unknown.clone() }).await.map(|_| ()),
        client.cancel_job(pb::CancelJobRequest { id: unknown }).await.map(|_| ()),
    ]
    .map(|answer| answer.expect_err("an unknown job").code());
    assert_eq!(codes, [Code::NotFound; 3]);

    let stale = pb::CompleteRequest { lease_id: Uuid::new_v4().to_string(), outcome: Some(success(b"r")) };
    let status = client.complete(stale).await.expect_err("a lease that is not current");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let reason = status.get_error_details().error_info().map(|info| info.reason.clone());
    assert_eq!(reason.as_deref(), Some("LEASE_LOST"));
    broker.stop().await;
}

#[tokio::test]
async fn limits_are_settings() {
    let database = test_database().await;
    let mut settings = Settings::with_database(&database);
    settings.limits.max_payload_bytes = 10;
    settings.limits.max_jobs_per_enqueue = 3;
    settings.limits.max_metadata_entries = 2;
    settings.limits.max_stream_capacity = 5;
    settings.limits.max_idempotency_key_bytes = 4;
    settings.limits.max_metadata_key_bytes = 3;
    settings.limits.max_metadata_value_bytes = 5;
    settings.limits.max_queues_per_stream = 2;
    settings.limits.max_leases_per_heartbeat = 2;
    settings.limits.max_progress_message_bytes = 6;
    settings.limits.max_page_size = 7;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let long_key = spec(|s| s.idempotency_key = "12345".into());
    assert_invalid(enqueue_all(&mut client, vec![long_key]).await, "jobs[0].idempotency_key");
    let long_name = spec(|s| s.metadata = HashMap::from([("abcd".into(), "v".into())]));
    assert_invalid(enqueue_all(&mut client, vec![long_name]).await, "jobs[0].metadata[abcd]");
    let long_value = spec(|s| s.metadata = HashMap::from([("k".into(), "123456".into())]));
    assert_invalid(enqueue_all(&mut client, vec![long_value]).await, "jobs[0].metadata[k]");
    let three = pb::Register {
        worker_id: "w".into(),
        queues: vec!["a".into(), "b".into(), "c".into()],
        capacity: 1,
        ..Default::default()
    };
    assert_invalid(TestWorker::register(client.clone(), three).await.map(|_| ()), "register.queues");
    let beats = (0..3).map(|_| pb::LeaseBeat { lease_id: Uuid::new_v4().to_string(), progress: None }).collect();
    assert_invalid(client.heartbeat(pb::HeartbeatRequest { leases: beats }).await, "leases");
    let progress = Some(pb::Progress { percent: 1, message: "1234567".into() });
    let beat = pb::LeaseBeat { lease_id: Uuid::new_v4().to_string(), progress };
    assert_invalid(client.heartbeat(pb::HeartbeatRequest { leases: vec![beat] }).await, "leases[0].progress.message");
    let mut admin = AdminServiceClient::new(broker.channel().await);
    let page = pb::ListJobsRequest { queue: "small".into(), page_size: 8, ..Default::default() };
    assert_invalid(admin.list_jobs(page).await, "page_size");

    let ten = || pb::JobSpec::new("small", "work", vec![1; 10]);
    assert_invalid(enqueue_all(&mut client, vec![spec(|s| s.payload = vec![1; 11])]).await, "jobs[0].payload");
    assert_invalid(enqueue_all(&mut client, vec![ten(), ten(), ten(), ten()]).await, "jobs");
    assert_invalid(enqueue_all(&mut client, vec![spec(|s| s.metadata = metadata(3))]).await, "jobs[0].metadata");
    let register =
        pb::Register { worker_id: "w".into(), queues: vec!["small".into()], capacity: 6, ..Default::default() };
    assert_invalid(TestWorker::register(client.clone(), register).await.map(|_| ()), "register.capacity");
    assert_eq!(count(&database, "jobs").await, 0);

    let ids = enqueue(&mut client, vec![ten(), ten(), spec(|s| s.metadata = metadata(2))]).await;
    assert_eq!(ids.len(), 3, "values at the lowered limits are accepted");
    let mut worker = TestWorker::connect(client.clone(), "w", &["small"], 5).await;
    let lease = worker.assignment(ARRIVES).await.lease_id;
    assert_invalid(worker.succeed(&lease, &[1; 11]).await, "success.result");
    assert_eq!(worker.succeed(&lease, &[1; 10]).await.expect("a result at the limit"), pb::JobState::Succeeded);
    broker.stop().await;
}
