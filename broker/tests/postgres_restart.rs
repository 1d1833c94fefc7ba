//! Postgres crashes and comes back under a running workload: while it is down the broker says NOT_SERVING and
//! answers UNAVAILABLE; afterwards it recovers by itself, and no acknowledged enqueue or completion is lost.

mod common;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use broker::{config::Settings, devdb::LocalPostgres};
use common::{TestBroker, private_postgres, wait_for, worker::*};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient, lease_response};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const QUEUE: &str = "restart";
const PRODUCERS: usize = 2;
const JOBS_PER_ENQUEUE: usize = 3;
/// Pace of each producer: a steady stream a single worker keeps up with.
const ENQUEUE_EVERY: Duration = Duration::from_millis(40);
/// Pause before a client retries a call that failed UNAVAILABLE.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Everything the broker acknowledged, and every error it answered, as the clients saw them.
#[derive(Default)]
struct Ledger {
    /// Ids of jobs whose Enqueue was answered OK.
    enqueued: Vec<String>,
    /// Ids of jobs whose Complete(success) was answered SUCCEEDED.
    completed: Vec<String>,
    /// `(what, code, message)` of every failed call.
    errors: Vec<(&'static str, Code, String)>,
}

type Shared = Arc<Mutex<Ledger>>;

fn record_error(ledger: &Shared, what: &'static str, status: &tonic::Status) {
    ledger.lock().unwrap().errors.push((what, status.code(), status.message().to_owned()));
}

async fn produce(mut client: BrokerServiceClient<Channel>, ledger: Shared, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ENQUEUE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let jobs = (0..JOBS_PER_ENQUEUE).map(|i| pb::JobSpec::new(QUEUE, "work", vec![i as u8])).collect();
        match client.enqueue(pb::EnqueueRequest { jobs }).await {
            Ok(answer) => ledger.lock().unwrap().enqueued.extend(answer.into_inner().jobs.into_iter().map(|j| j.id)),
            Err(status) => record_error(&ledger, "enqueue", &status),
        }
    }
}

/// Completes one lease, retrying while the broker answers UNAVAILABLE, as a worker would.
async fn complete(mut client: BrokerServiceClient<Channel>, lease_id: String, job_id: String, ledger: Shared) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let request = pb::CompleteRequest { lease_id: lease_id.clone(), outcome: Some(success(job_id.as_bytes())) };
        match client.complete(request).await.map(|answer| answer.into_inner().state()) {
            Ok(pb::JobState::Succeeded) => {
                ledger.lock().unwrap().completed.push(job_id);
                return;
            }
            Ok(other) => {
                let status = tonic::Status::unknown(format!("complete answered {other:?}"));
                return record_error(&ledger, "complete", &status);
            }
            // An earlier try may have committed without an answer, or the lease expired while Postgres was down:
            // either way the job is no longer ours.
            Err(status) if status.code() == Code::Aborted => return,
            Err(status) => {
                record_error(&ledger, "complete", &status);
                if status.code() != Code::Unavailable {
                    return;
                }
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// One worker stream that completes everything it is given, until stopped.
async fn work(client: BrokerServiceClient<Channel>, ledger: Shared, stop: CancellationToken) {
    let mut worker = TestWorker::connect(client.clone(), "survivor", &[QUEUE], 16).await;
    let mut completions = JoinSet::new();
    while !stop.is_cancelled() {
        while completions.try_join_next().is_some() {}
        match worker.next_message(Duration::from_millis(100)).await {
            None => {}
            Some(Ok(lease_response::Response::Assignment(assignment))) => {
                let job_id = assignment.job.expect("an assignment carries its job").id;
                completions.spawn(complete(client.clone(), assignment.lease_id, job_id, ledger.clone()));
            }
            Some(Ok(other)) => panic!("unexpected message on the Lease stream: {other:?}"),
            Some(Err(status)) => {
                // A real worker reconnects; the test still requires the code to be UNAVAILABLE (checked at the end).
                record_error(&ledger, "lease stream", &status);
                worker = TestWorker::connect(client.clone(), "survivor", &[QUEUE], 16).await;
            }
        }
    }
    completions.join_all().await;
}

async fn health(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let answer =
        client.check(HealthCheckRequest { service: service.into() }).await.expect("the health service answers");
    answer.into_inner().status()
}

async fn wait_for_health(client: &HealthClient<Channel>, wanted: ServingStatus, timeout: Duration) {
    wait_for(&format!("health {wanted:?}"), timeout, || {
        let mut client = client.clone();
        async move {
            let whole = health(&mut client, "").await;
            let service = health(&mut client, "jobbroker.v1.BrokerService").await;
            (whole == wanted && service == wanted).then_some(())
        }
    })
    .await
}

/// Runs a blocking `LocalPostgres` call off the async threads.
async fn on_postgres(pg: &Arc<LocalPostgres>, what: &str, call: fn(&LocalPostgres) -> anyhow::Result<()>) {
    let pg = pg.clone();
    let done = tokio::task::spawn_blocking(move || call(&pg)).await.expect("the Postgres call ran");
    done.unwrap_or_else(|e| panic!("{what}: {e:#}"));
}

fn snapshot(ledger: &Shared) -> (Vec<String>, Vec<String>) {
    let ledger = ledger.lock().unwrap();
    (ledger.enqueued.clone(), ledger.completed.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_crash_loses_nothing_acknowledged_and_the_broker_recovers_by_itself() {
    let pg = Arc::new(tokio::task::spawn_blocking(|| private_postgres("pg-restart")).await.expect("initdb ran"));
    let mut settings = Settings::with_database(pg.url());
    settings.db_acquire_timeout = Duration::from_secs(1);
    settings.reaper_interval = Duration::from_millis(200);
    settings.poll_interval = Duration::from_millis(500);
    settings.reconnect_grace = Duration::from_secs(1);
    settings.shutdown_grace = Duration::from_secs(2);
    // Leases whose completion was lost with the crash come back soon enough for the drain at the end.
    settings.defaults.lease_ttl = Duration::from_secs(5);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let health_client = HealthClient::new(broker.channel().await);
    wait_for_health(&health_client, ServingStatus::Serving, Duration::from_secs(10)).await;

    let ledger = Shared::default();
    let (stop_producers, stop_worker) = (CancellationToken::new(), CancellationToken::new());
    let mut producers = JoinSet::new();
    for _ in 0..PRODUCERS {
        producers.spawn(produce(client.clone(), ledger.clone(), stop_producers.clone()));
    }
    let worker = tokio::spawn(work(client.clone(), ledger.clone(), stop_worker.clone()));
    wait_for("the workload to get going", Duration::from_secs(20), || async {
        let (enqueued, completed) = snapshot(&ledger);
        (enqueued.len() >= 60 && completed.len() >= 30).then_some(())
    })
    .await;

    // Crash: no shutdown checkpoint, every connection cut.
    on_postgres(&pg, "crashing Postgres", LocalPostgres::stop_immediate).await;
    let (acked_before, completed_before) = snapshot(&ledger);
    let down = Instant::now();
    wait_for_health(&health_client, ServingStatus::NotServing, Duration::from_secs(10)).await;
    println!("health NOT_SERVING {:.2?} after the crash", down.elapsed());
    // Concurrently: each waits out the pool's acquire timeout.
    let lease = uuid::Uuid::new_v4().to_string();
    let (mut c1, mut c2, mut c3, mut c4) = (client.clone(), client.clone(), client.clone(), client.clone());
    let jobs = vec![pb::JobSpec::new(QUEUE, "work", b"while down".to_vec())];
    let beats = vec![pb::LeaseBeat { lease_id: lease.clone(), progress: None }];
    let (enqueued, got, beat, completed) = tokio::join!(
        c1.enqueue(pb::EnqueueRequest { jobs }),
        c2.get_job(pb::GetJobRequest { id: acked_before[0].clone() }),
        c3.heartbeat(pb::HeartbeatRequest { leases: beats }),
        c4.complete(pb::CompleteRequest { lease_id: lease, outcome: Some(release()) }),
    );
    let calls =
        [("Enqueue", enqueued.err()), ("GetJob", got.err()), ("Heartbeat", beat.err()), ("Complete", completed.err())];
    for (call, error) in calls {
        let status = error.unwrap_or_else(|| panic!("{call} succeeded while Postgres was down"));
        assert_eq!(status.code(), Code::Unavailable, "{call} while Postgres is down: {status:?}");
    }

    on_postgres(&pg, "starting Postgres again", LocalPostgres::restart).await;
    let up = Instant::now();
    wait_for_health(&health_client, ServingStatus::Serving, Duration::from_secs(20)).await;
    println!("Postgres down for {:.2?}; health SERVING {:.2?} after it came back", up - down, up.elapsed());

    // Enqueue and lease work again, on the same broker: a new stream gets a new job, and the workload moves on.
    let id = enqueue(&mut client, vec![pb::JobSpec::new("after-restart", "probe", b"".to_vec())]).await.remove(0);
    let mut probe = TestWorker::connect(client.clone(), "probe", &["after-restart"], 1).await;
    let assignment = probe.assignment(Duration::from_secs(5)).await;
    assert_eq!(assignment.job.expect("a job").id, id);
    assert_eq!(
        probe.succeed(&assignment.lease_id, b"ok").await.expect("complete after the restart"),
        pb::JobState::Succeeded
    );
    let completed_at_restart = snapshot(&ledger).1.len();
    wait_for("the workload to complete jobs again", Duration::from_secs(20), || async {
        (snapshot(&ledger).1.len() >= completed_at_restart + 30).then_some(())
    })
    .await;

    // Nothing acknowledged before the crash was lost.
    for id in &acked_before {
        get_job(&mut client, id).await;
    }
    for id in &completed_before {
        assert_eq!(get_job(&mut client, id).await.state(), pb::JobState::Succeeded, "job {id} was completed");
    }

    // Drain: every acknowledged job ends SUCCEEDED, each acknowledged completion included.
    stop_producers.cancel();
    producers.join_all().await;
    let (acked, _) = snapshot(&ledger);
    let pending: Mutex<HashSet<String>> = Mutex::new(acked.iter().cloned().collect());
    println!("{} jobs acknowledged ({} before the crash)", acked.len(), acked_before.len());
    wait_for("every acknowledged job to succeed", Duration::from_secs(30), || {
        let (mut client, pending) = (client.clone(), &pending);
        async move {
            let unfinished: Vec<String> = pending.lock().unwrap().iter().cloned().collect();
            for id in unfinished {
                let job = get_job(&mut client, &id).await;
                assert!(
                    matches!(job.state(), pb::JobState::Queued | pb::JobState::Leased | pb::JobState::Succeeded),
                    "job {id} ended {:?} ({})",
                    job.state(),
                    job.last_error
                );
                if job.state() == pb::JobState::Succeeded {
                    pending.lock().unwrap().remove(&id);
                }
            }
            pending.lock().unwrap().is_empty().then_some(())
        }
    })
    .await;
    stop_worker.cancel();
    worker.await.expect("the worker task");

    let ledger = Arc::into_inner(ledger).expect("the tasks are done").into_inner().unwrap();
    let completed: HashSet<&String> = ledger.completed.iter().collect();
    assert_eq!(completed.len(), ledger.completed.len(), "a job's completion was acknowledged twice");
    for id in &ledger.completed {
        assert_eq!(get_job(&mut client, id).await.state(), pb::JobState::Succeeded, "job {id} was completed");
    }
    let unexpected: Vec<_> = ledger.errors.iter().filter(|(_, code, _)| *code != Code::Unavailable).collect();
    assert!(unexpected.is_empty(), "calls failed with other codes than UNAVAILABLE: {unexpected:#?}");
    println!(
        "{} enqueues and {} completions acknowledged; {} calls answered UNAVAILABLE during the outage",
        ledger.enqueued.len(),
        ledger.completed.len(),
        ledger.errors.len()
    );
    broker.stop().await;
    tokio::task::spawn_blocking(move || drop(pg)).await.expect("Postgres removed");
}
