//! Enqueue over real gRPC: idempotency keys (repeats, conflicts, races, per-queue scope), atomic batches, and
//! group commit under concurrency. What was stored is checked in Postgres itself, read-only.

mod common;

use std::collections::HashSet;

use broker::config::Settings;
use common::{TestBroker, test_database};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use sqlx::{Connection, PgConnection};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

/// A broker on a fresh database, a client, and the database URL for reading what was stored.
async fn setup() -> (TestBroker, BrokerServiceClient<Channel>, String) {
    let database = test_database().await;
    let broker = TestBroker::start(Settings::with_database(&database)).await;
    let client = broker.client().await;
    (broker, client, database)
}

fn keyed(queue: &str, key: &str, payload: &str) -> pb::JobSpec {
    pb::JobSpec { idempotency_key: key.into(), ..pb::JobSpec::new(queue, "work", payload.as_bytes().to_vec()) }
}

async fn enqueue(
    client: &mut BrokerServiceClient<Channel>,
    jobs: Vec<pb::JobSpec>,
) -> Result<Vec<pb::EnqueuedJob>, Status> {
    Ok(client.enqueue(pb::EnqueueRequest { jobs }).await?.into_inner().jobs)
}

/// `SELECT count(*) FROM {table}` on the test database.
async fn count(database: &str, table: &str) -> i64 {
    let mut conn = PgConnection::connect(database).await.expect("connecting to the test database");
    let sql = format!("SELECT count(*) FROM {table}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await.expect("counting rows")
}

/// The ids of every live job, as stored.
async fn stored_ids(database: &str) -> HashSet<String> {
    let mut conn = PgConnection::connect(database).await.expect("connecting to the test database");
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs").fetch_all(&mut conn).await.expect("reading ids");
    ids.into_iter().map(|id| id.to_string()).collect()
}

/// The fields named in the status's google.rpc.BadRequest details.
fn bad_fields(status: &Status) -> Vec<String> {
    let details = status.get_error_details();
    let bad_request = details.bad_request().unwrap_or_else(|| panic!("no BadRequest details in {status:?}"));
    bad_request.field_violations.iter().map(|v| v.field.clone()).collect()
}

#[tokio::test]
async fn the_same_key_with_the_same_spec_returns_the_existing_job() {
    let (broker, mut client, database) = setup().await;

    let first = enqueue(&mut client, vec![keyed("mail", "k1", "hello")]).await.expect("first enqueue");
    assert!(first[0].created, "the first enqueue creates the job");
    let again = enqueue(&mut client, vec![keyed("mail", "k1", "hello")]).await.expect("repeat enqueue");
    assert_eq!(again[0].id, first[0].id, "a repeat returns the existing job");
    assert!(!again[0].created, "a repeat creates nothing");

    // Inside one batch: the second mention repeats the first; an already stored key repeats too.
    let batch = vec![keyed("mail", "k2", "x"), keyed("mail", "k2", "x"), keyed("mail", "k1", "hello")];
    let answer = enqueue(&mut client, batch).await.expect("batch enqueue");
    assert!(answer[0].created);
    assert_eq!((answer[1].id.as_str(), answer[1].created), (answer[0].id.as_str(), false));
    assert_eq!((answer[2].id.as_str(), answer[2].created), (first[0].id.as_str(), false));

    assert_eq!(count(&database, "jobs").await, 2, "only two jobs exist");
    assert_eq!(count(&database, "idempotency_keys").await, 2);
    broker.stop().await;
}

#[tokio::test]
async fn concurrent_enqueues_racing_with_one_key_create_exactly_one_job() {
    let (broker, client, database) = setup().await;
    const KEYS: usize = 10;
    const RACERS: usize = 8;

    let mut calls = tokio::task::JoinSet::new();
    for racer in 0..RACERS {
        for key in 0..KEYS {
            let mut client = client.clone();
            calls.spawn(async move {
                let answer = enqueue(&mut client, vec![keyed("race", &format!("key-{key}"), "same")]).await;
                (key, racer, answer.expect("every racer is acknowledged").remove(0))
            });
        }
    }
    let mut per_key: Vec<Vec<pb::EnqueuedJob>> = vec![Vec::new(); KEYS];
    while let Some(joined) = calls.join_next().await {
        let (key, _racer, job) = joined.expect("the call task ran");
        per_key[key].push(job);
    }
    for (key, answers) in per_key.iter().enumerate() {
        let created = answers.iter().filter(|a| a.created).count();
        assert_eq!(created, 1, "key-{key}: exactly one racer creates the job, got {answers:?}");
        let ids: HashSet<&str> = answers.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids.len(), 1, "key-{key}: every racer gets the same job, got {answers:?}");
    }
    assert_eq!(count(&database, "jobs").await, KEYS as i64, "one job per key is stored");
    broker.stop().await;
}

#[tokio::test]
async fn the_same_key_with_another_spec_is_already_exists_and_stores_nothing_of_that_request() {
    let (broker, mut client, database) = setup().await;
    let original = enqueue(&mut client, vec![keyed("mail", "k", "original")]).await.expect("first enqueue");

    // The conflicting job comes second: the innocent first job of the same request must not be stored either.
    let batch = vec![pb::JobSpec::new("mail", "work", b"innocent".to_vec()), keyed("mail", "k", "changed")];
    let status = enqueue(&mut client, batch).await.expect_err("a different spec under the same key");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // A different option (not just the payload) is a different spec too.
    let mut other = keyed("mail", "k", "original");
    other.priority = 7;
    let status = enqueue(&mut client, vec![other]).await.expect_err("a different priority under the same key");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    assert_eq!(count(&database, "jobs").await, 1, "only the original job is stored");
    let job = common::worker::get_job(&mut client, &original[0].id).await;
    assert_eq!(job.spec.expect("spec").payload, b"original", "the stored job is unchanged");
    broker.stop().await;
}

#[tokio::test]
async fn the_same_key_in_another_queue_is_another_job() {
    let (broker, mut client, database) = setup().await;
    let answer = enqueue(&mut client, vec![keyed("one", "k", "p"), keyed("two", "k", "p")]).await.expect("enqueue");
    assert!(answer[0].created && answer[1].created, "{answer:?}");
    assert_ne!(answer[0].id, answer[1].id);
    // And each is found again under its own queue.
    let again = enqueue(&mut client, vec![keyed("two", "k", "p"), keyed("one", "k", "p")]).await.expect("repeat");
    assert_eq!((again[0].id.as_str(), again[0].created), (answer[1].id.as_str(), false));
    assert_eq!((again[1].id.as_str(), again[1].created), (answer[0].id.as_str(), false));
    assert_eq!(count(&database, "jobs").await, 2);
    broker.stop().await;
}

#[tokio::test]
async fn a_batch_with_one_invalid_job_is_refused_whole() {
    let (broker, mut client, database) = setup().await;
    let mut jobs: Vec<pb::JobSpec> = (0..50).map(|i| keyed("mail", &format!("k{i}"), "p")).collect();
    jobs[2].queue = "no spaces allowed".into();

    let status = enqueue(&mut client, jobs).await.expect_err("an invalid job");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(bad_fields(&status), ["jobs[2].queue"]);

    assert_eq!(count(&database, "jobs").await, 0, "no job of the batch is stored");
    assert_eq!(count(&database, "idempotency_keys").await, 0, "no key of the batch is taken");
    broker.stop().await;
}

#[tokio::test]
async fn an_acknowledged_batch_of_1000_jobs_is_all_stored() {
    let (broker, mut client, database) = setup().await;
    let jobs = (0..1000).map(|i| pb::JobSpec::new(format!("q{}", i % 7), "work", format!("job {i}"))).collect();

    let answer = enqueue(&mut client, jobs).await.expect("a full batch");
    assert_eq!(answer.len(), 1000);
    assert!(answer.iter().all(|a| a.created));
    let acknowledged: HashSet<String> = answer.into_iter().map(|a| a.id).collect();
    assert_eq!(acknowledged.len(), 1000, "every job has its own id");
    assert_eq!(stored_ids(&database).await, acknowledged, "exactly the acknowledged jobs are stored");
    broker.stop().await;
}

/// A job that sets every field of its spec, each value depending on `i`.
fn spelled_out(i: u32, payload: &str) -> pb::JobSpec {
    let seconds = |s: u32| Some(std::time::Duration::from_secs(u64::from(s)).try_into().expect("a duration"));
    pb::JobSpec {
        priority: i as i32 * 10 - 5,
        run_at: Some(prost_types::Timestamp { seconds: 4_000_000_000 + i64::from(i), nanos: 0 }),
        max_attempts: 3 + i,
        lease_ttl: seconds(10 + i),
        execution_timeout: seconds(60 + i),
        idempotency_key: format!("key-{i}-{payload}"),
        retry: Some(pb::RetryPolicy {
            initial_backoff: seconds(1 + i),
            max_backoff: seconds(100 + i),
            multiplier: 1.5 + f64::from(i),
        }),
        metadata: [(format!("k{i}"), format!("v{i}"))].into(),
        ..pb::JobSpec::new(format!("spelled-{i}"), format!("kind-{i}"), payload.to_owned())
    }
}

/// The insert binds a column once when every job of the batch shares its value, and per job otherwise: both ways
/// every job must come back from GetJob exactly as it was sent.
#[tokio::test]
async fn each_job_is_stored_as_sent_whether_its_batch_shares_a_value_or_not() {
    let (broker, mut client, _database) = setup().await;
    let sparse = pb::JobSpec::new("spelled-9", "kind-9", "sparse");
    let mixed = vec![spelled_out(0, "a"), spelled_out(1, "b"), sparse.clone()];
    let shared = vec![spelled_out(5, "c"), spelled_out(5, "d")]
        .into_iter()
        .map(|spec| pb::JobSpec { idempotency_key: String::new(), ..spec })
        .collect::<Vec<_>>();

    for batch in [mixed.clone(), shared.clone()] {
        let answer = enqueue(&mut client, batch.clone()).await.expect("a valid batch");
        for (sent, enqueued) in batch.iter().zip(answer) {
            let job = client
                .get_job(pb::GetJobRequest { id: enqueued.id })
                .await
                .expect("the job")
                .into_inner()
                .job
                .expect("a job");
            let stored = job.spec.expect("a spec");
            if *sent == sparse {
                assert_eq!(
                    (stored.queue, stored.kind, stored.payload),
                    (sent.queue.clone(), sent.kind.clone(), sent.payload.clone())
                );
                assert_eq!(stored.idempotency_key, "", "no other job's key");
                assert!(stored.metadata.is_empty(), "no other job's metadata");
                assert_eq!(job.run_at, job.created_at, "due at once, not at another job's run_at");
            } else {
                assert_eq!(&stored, sent, "stored as sent");
            }
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn concurrent_single_job_enqueues_are_all_acknowledged_and_stored() {
    let (broker, client, database) = setup().await;
    const TASKS: usize = 32;
    const PER_TASK: usize = 50;

    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut ids = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let spec = pb::JobSpec::new("burst", "work", format!("{task}/{i}"));
                let mut answer = enqueue(&mut client, vec![spec]).await.expect("every enqueue is acknowledged");
                assert!(answer[0].created);
                ids.push(answer.remove(0).id);
            }
            ids
        });
    }
    let mut acknowledged = HashSet::new();
    while let Some(ids) = tasks.join_next().await {
        for id in ids.expect("the enqueue task ran") {
            assert!(acknowledged.insert(id.clone()), "id {id} was handed out twice");
        }
    }
    println!("{} concurrent single-job enqueues in {:?}", TASKS * PER_TASK, started.elapsed());
    assert_eq!(acknowledged.len(), TASKS * PER_TASK);
    assert_eq!(stored_ids(&database).await, acknowledged, "exactly the acknowledged jobs are stored");
    broker.stop().await;
}
