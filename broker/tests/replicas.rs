//! Two broker replicas sharing one database: no job is leased to two holders, every job succeeds exactly once, and
//! an enqueue on one replica, or a job released there, reaches a worker waiting on the other at once
//! (LISTEN/NOTIFY, not polling), as does the slot of a lease completed through the other replica; a watcher on one
//! replica sees every change made through the other within its watch poll.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use broker::config::Settings;
use common::{TestBroker, test_database, worker::*};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient, lease_response};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinSet;
use tonic::transport::Channel;

const JOBS: usize = 5_000;
const BATCH: usize = 250;
const WORKERS_PER_REPLICA: usize = 4;
const CAPACITY: u32 = 16;
/// The whole run must finish well within this, even on a loaded 2-core machine.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// What one worker saw: each assignment's job id and attempt, and every answer to its completions.
#[derive(Default)]
struct WorkerLog {
    assigned: Vec<(String, u32)>,
    answers: Vec<Result<pb::JobState, tonic::Status>>,
}

/// Takes assignments until `completed` reaches [`JOBS`], completing each one concurrently with a result naming
/// itself.
async fn run_worker(mut worker: TestWorker, name: String, completed: Arc<AtomicUsize>) -> WorkerLog {
    let mut log = WorkerLog::default();
    let mut completions = JoinSet::new();
    let deadline = Instant::now() + RUN_DEADLINE;
    while completed.load(Ordering::SeqCst) < JOBS {
        assert!(Instant::now() < deadline, "{name}: the run did not finish within {RUN_DEADLINE:?}");
        while let Some(answer) = completions.try_join_next() {
            log.answers.push(answer.expect("a completion task"));
        }
        let assignment = match worker.next_message(Duration::from_millis(200)).await {
            None => continue,
            Some(Ok(lease_response::Response::Assignment(assignment))) => assignment,
            Some(other) => panic!("{name}: expected assignments only, got {other:?}"),
        };
        let job = assignment.job.expect("an assignment carries its job");
        log.assigned.push((job.id, job.attempt));
        let (mut client, completed, result) = (worker.client.clone(), completed.clone(), name.clone().into_bytes());
        completions.spawn(async move {
            let request = pb::CompleteRequest { lease_id: assignment.lease_id, outcome: Some(success(&result)) };
            let answer = client.complete(request).await.map(|r| r.into_inner().state());
            completed.fetch_add(1, Ordering::SeqCst);
            answer
        });
    }
    while let Some(answer) = completions.join_next().await {
        log.answers.push(answer.expect("a completion task"));
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_jobs_over_two_replicas_each_succeed_exactly_once() {
    let database = test_database().await;
    let replicas = [
        TestBroker::start(Settings::with_database(database.clone())).await,
        TestBroker::start(Settings::with_database(database.clone())).await,
    ];
    let mut clients: Vec<BrokerServiceClient<Channel>> = Vec::new();
    for replica in &replicas {
        clients.push(replica.client().await);
    }

    let completed = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for (r, client) in clients.iter().enumerate() {
        for w in 0..WORKERS_PER_REPLICA {
            let name = format!("replica{r}-worker{w}");
            let worker = TestWorker::connect(client.clone(), &name, &["bulk"], CAPACITY).await;
            let completed = completed.clone();
            workers.spawn(async move { (name.clone(), run_worker(worker, name, completed).await) });
        }
    }

    // Batches alternate between the replicas and run concurrently with the workers.
    let started = Instant::now();
    let mut producers = JoinSet::new();
    for b in 0..JOBS / BATCH {
        let mut client = clients[b % 2].clone();
        producers.spawn(async move {
            let specs = (0..BATCH).map(|i| pb::JobSpec::new("bulk", "echo", format!("{b}/{i}").into_bytes())).collect();
            enqueue(&mut client, specs).await
        });
    }
    let mut enqueued = HashSet::new();
    while let Some(ids) = producers.join_next().await {
        enqueued.extend(ids.expect("a producer task"));
    }
    assert_eq!(enqueued.len(), JOBS, "every enqueued job got its own id");

    let mut assigned_to: HashMap<String, Vec<String>> = HashMap::new();
    let mut answers = 0;
    while let Some(done) = workers.join_next().await {
        let (name, log) = done.expect("a worker task");
        for answer in &log.answers {
            match answer {
                Ok(pb::JobState::Succeeded) => answers += 1,
                other => {
                    panic!("{name}: a completion was answered {other:?}, not SUCCEEDED: a lease was not exclusive")
                }
            }
        }
        for (id, attempt) in log.assigned {
            assert_eq!(attempt, 1, "{name} got job {id} as attempt {attempt}");
            assigned_to.entry(id).or_default().push(name.clone());
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{JOBS} jobs over 2 replicas, {} workers: {:.2?}, {:.0} jobs/s (enqueue to last completion)",
        2 * WORKERS_PER_REPLICA,
        elapsed,
        JOBS as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(answers, JOBS, "one SUCCEEDED answer per job");
    let twice: Vec<_> = assigned_to.iter().filter(|(_, holders)| holders.len() > 1).collect();
    assert!(twice.is_empty(), "jobs leased to more than one holder: {twice:?}");
    let assigned: HashSet<String> = assigned_to.keys().cloned().collect();
    assert_eq!(assigned, enqueued, "exactly the enqueued jobs were assigned");

    // The database agrees: every job finished once, succeeded on its first attempt, by the worker that held it.
    let mut db = PgConnection::connect(&database).await.expect("connecting to the test database");
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&mut db).await.expect("count jobs");
    assert_eq!(live, 0, "no job is left queued or leased");
    let rows: Vec<(String, String, i32, String, Vec<u8>)> =
        sqlx::query_as("SELECT id::text, state, attempt, worker_id, result FROM finished_jobs")
            .fetch_all(&mut db)
            .await
            .expect("read finished_jobs");
    assert_eq!(rows.len(), JOBS, "one finished row per job");
    for (id, state, attempt, worker_id, result) in rows {
        assert_eq!((state.as_str(), attempt), ("succeeded", 1), "job {id}");
        assert_eq!(assigned_to[&id], vec![worker_id.clone()], "job {id} finished by the worker that held it");
        assert_eq!(result, worker_id.into_bytes(), "job {id} kept the result of its only holder");
    }
    let _ = db.close().await;
    for replica in replicas {
        replica.stop().await;
    }
}

/// Two replicas on a fresh database that poll every 30 s: a pickup within a second cannot come from their poll or
/// their lease reconciliation, only from a cross-replica notification.
async fn two_replicas_polling_slowly() -> (TestBroker, TestBroker) {
    let mut settings = Settings::with_database(test_database().await);
    settings.poll_interval = Duration::from_secs(30);
    (TestBroker::start(settings.clone()).await, TestBroker::start(settings).await)
}

#[tokio::test]
async fn an_enqueue_on_one_replica_wakes_a_worker_waiting_on_the_other_at_once() {
    let (a, b) = two_replicas_polling_slowly().await;
    let (mut client_a, mut client_b) = (a.client().await, b.client().await);
    let mut on_a = TestWorker::connect(client_a.clone(), "waits-on-a", &["to-a"], 10).await;
    let mut on_b = TestWorker::connect(client_b.clone(), "waits-on-b", &["to-b"], 10).await;

    // The workers hold their jobs (no completion), so nothing but an enqueue wakes their replica's dispatch. A
    // worker's first claim, right after it registers, might catch the first round's job; later rounds only the
    // notification can deliver.
    for round in 0..3 {
        for (queue, producer, worker) in [("to-b", &mut client_a, &mut on_b), ("to-a", &mut client_b, &mut on_a)] {
            let sent = Instant::now();
            let id = enqueue(producer, vec![pb::JobSpec::new(queue, "ping", b"".to_vec())]).await.remove(0);
            let assignment = worker.assignment(Duration::from_secs(5)).await;
            let latency = sent.elapsed();
            println!("round {round}: enqueue for {queue} on the other replica picked up after {latency:.2?}");
            assert_eq!(assignment.job.expect("a job").id, id);
            assert!(latency < Duration::from_secs(1), "{queue}: pickup took {latency:?} (poll interval is 30 s)");
        }
    }
    drop((on_a, on_b));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_job_released_on_one_replica_reaches_a_worker_waiting_on_the_other_at_once() {
    let (a, b) = two_replicas_polling_slowly().await;
    let mut client_a = a.client().await;
    let mut holder = TestWorker::connect(client_a.clone(), "holds-on-a", &["released"], 1).await;
    let id = enqueue(&mut client_a, vec![pb::JobSpec::new("released", "work", b"".to_vec())]).await.remove(0);
    let lease = holder.assignment(Duration::from_secs(5)).await.lease_id;
    let mut waiting = TestWorker::connect(b.client().await, "waits-on-b", &["released"], 1).await;
    // B's first claim, right after it registers, finds the job leased; after that only a wake can bring it.
    waiting.expect_nothing(Duration::from_millis(300)).await;

    // The holder takes no more jobs (processed before the release, on the same stream), then gives this one back.
    holder.set_capacity(0).await;
    let released = Instant::now();
    holder.complete_on_stream(&lease, release()).await;
    assert_eq!(holder.completed(Duration::from_secs(5)).await.state(), pb::JobState::Queued);
    let assignment = waiting.assignment(Duration::from_secs(5)).await;
    let latency = released.elapsed();
    println!("released on replica A, picked up on replica B after {latency:.2?}");
    assert_eq!(assignment.job.expect("a job").id, id);
    assert!(latency < Duration::from_secs(1), "pickup took {latency:?} (poll interval is 30 s)");
    drop((holder, waiting));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_lease_completed_through_the_other_replica_frees_its_streams_slot_at_once() {
    let (a, b) = two_replicas_polling_slowly().await;
    let mut client_a = a.client().await;
    let mut holder = TestWorker::connect(client_a.clone(), "one-slot-on-a", &["elsewhere"], 1).await;
    let jobs = (0..2).map(|_| pb::JobSpec::new("elsewhere", "work", b"".to_vec())).collect();
    let ids = enqueue(&mut client_a, jobs).await;
    let first = holder.assignment(Duration::from_secs(5)).await;
    assert_eq!(first.job.as_ref().expect("a job").id, ids[0]);
    holder.expect_nothing(Duration::from_millis(300)).await;

    // Completed through replica B (a client whose unary calls reach another replica than its stream).
    let completed = Instant::now();
    let request = pb::CompleteRequest { lease_id: first.lease_id.clone(), outcome: Some(success(b"done")) };
    let state = b.client().await.complete(request).await.expect("complete through B").into_inner().state();
    assert_eq!(state, pb::JobState::Succeeded);
    let second = holder.assignment(Duration::from_secs(5)).await;
    let latency = completed.elapsed();
    println!("completed through replica B, next job on replica A's freed slot after {latency:.2?}");
    assert_eq!(second.job.expect("a job").id, ids[1]);
    assert!(latency < Duration::from_secs(1), "the slot freed after {latency:?} (poll interval is 30 s)");
    drop(holder);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_watcher_on_one_replica_sees_each_change_made_through_the_other_within_its_watch_poll() {
    let (a, b) = two_replicas_polling_slowly().await;
    let mut client_a = a.client().await;
    let id = enqueue(&mut client_a, vec![pb::JobSpec::new("watched", "work", b"".to_vec())]).await.remove(0);
    let mut watch = b.client().await.watch_job(pb::WatchJobRequest { id }).await.expect("watch").into_inner();
    let mut next_state = async || {
        let message = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("a change in time");
        message.expect("the watch is open").expect("a change").job.expect("a job")
    };
    assert_eq!(next_state().await.state(), pb::JobState::Queued);

    // Every change is made through A; B's own writes would wake its watchers without any poll.
    let mut worker = TestWorker::connect(client_a.clone(), "works-on-a", &["watched"], 1).await;
    let leased_at = Instant::now();
    let lease = worker.assignment(Duration::from_secs(5)).await.lease_id;
    let leased = next_state().await;
    let seen_leased = leased_at.elapsed();
    assert_eq!((leased.state(), leased.worker_id.as_str()), (pb::JobState::Leased, "works-on-a"));
    let progress = pb::Progress { percent: 60, message: "most of it".into() };
    let beat_at = Instant::now();
    assert!(worker.heartbeat(&lease, Some(progress.clone())).await.active);
    assert_eq!(next_state().await.progress, Some(progress));
    let seen_progress = beat_at.elapsed();
    let completed_at = Instant::now();
    assert_eq!(worker.succeed(&lease, b"ok").await.expect("complete"), pb::JobState::Succeeded);
    let done = next_state().await;
    let seen_done = completed_at.elapsed();
    assert_eq!((done.state(), done.result.as_slice()), (pb::JobState::Succeeded, b"ok".as_slice()));
    println!(
        "replica B's watcher saw A's lease after {seen_leased:.2?}, progress {seen_progress:.2?}, success {seen_done:.2?}"
    );
    for seen in [seen_leased, seen_progress, seen_done] {
        assert!(seen < Duration::from_secs(2), "a change reached the watcher after {seen:?} (poll interval 30 s)");
    }
    drop(worker);
    a.stop().await;
    b.stop().await;
}
