//! A property test of the job state machine (SPEC: States, Fencing): random sequences of enqueue, lease,
//! heartbeat, complete (every outcome), expire, cancel and zombie calls on stale leases, on a few jobs and workers.
//! After every step a model of SPEC's state table predicts each job, and GetJob must agree: state, attempt, cancel
//! flag, holder, last error, result, progress. Terminal jobs never change, a stale lease's Complete is ABORTED and
//! changes nothing, and every observed transition is one the table allows.
//!
//! Each lease is taken on a Lease stream of its own (capacity 1) that is dropped once the assignment arrives (the
//! test waits until the broker has closed it), with a reconnect grace far longer than a case: so the broker pushes
//! jobs only when the test asks for one, and the model stays exact between steps. Leases live on after their
//! stream (SPEC: a lease stays current until reassigned).

mod common;

use std::time::Duration;

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use pb::JobState::{Cancelled, Failed, Leased, Queued, Succeeded};
use proptest::{prelude::*, sample::Index};
use sqlx::{Connection, PgConnection};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

const QUEUE: &str = "sm";
const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
const MAX_JOBS: usize = 5;
/// A retry that becomes due while the test waits for it.
const RETRY_LATER: Duration = Duration::from_millis(150);
/// Long enough for any queued job to come due (retry delay, backoff) and be pushed, on a loaded machine.
const LEASE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Success,
    /// Retryable, due at once (the shortest `retry_after`).
    RetryNow,
    /// Retryable, due after [`RETRY_LATER`].
    RetryLater,
    NonRetryable,
    Release,
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        max_attempts: u32,
    },
    /// The worker opens a stream and receives one assignment (or, with nothing queued, nothing).
    Lease {
        worker: usize,
    },
    /// `current`: one of the current leases if there is one; otherwise any lease ever granted (often stale).
    Heartbeat {
        lease: Index,
        current: bool,
        percent: u32,
    },
    Complete {
        lease: Index,
        current: bool,
        finish: Finish,
    },
    /// A current lease's deadline passes; the reaper must treat it as lost.
    Expire {
        lease: Index,
    },
    /// `live`: one of the QUEUED or LEASED jobs if there is one; otherwise any job (often terminal).
    Cancel {
        job: Index,
        live: bool,
    },
}

fn finish() -> impl Strategy<Value = Finish> {
    prop_oneof![
        Just(Finish::Success),
        Just(Finish::RetryNow),
        Just(Finish::RetryLater),
        Just(Finish::NonRetryable),
        Just(Finish::Release),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u32..=3).prop_map(|max_attempts| Op::Enqueue { max_attempts }),
        4 => (0..WORKERS.len()).prop_map(|worker| Op::Lease { worker }),
        2 => (any::<Index>(), any::<bool>(), 0u32..=100)
            .prop_map(|(lease, current, percent)| Op::Heartbeat { lease, current, percent }),
        4 => (any::<Index>(), prop::bool::weighted(0.75), finish())
            .prop_map(|(lease, current, finish)| Op::Complete { lease, current, finish }),
        1 => any::<Index>().prop_map(|lease| Op::Expire { lease }),
        1 => (any::<Index>(), prop::bool::weighted(0.75)).prop_map(|(job, live)| Op::Cancel { job, live }),
    ]
}

/// A few enqueues first, so that most steps find jobs and leases to act on, then any steps.
fn ops() -> impl Strategy<Value = Vec<Op>> {
    (prop::collection::vec(1u32..=3, 1..=3), prop::collection::vec(op(), 10..45)).prop_map(|(first, then)| {
        first.into_iter().map(|max_attempts| Op::Enqueue { max_attempts }).chain(then).collect()
    })
}

/// What the model knows about one job.
#[derive(Debug)]
struct ModelJob {
    id: String,
    max_attempts: u32,
    state: pb::JobState,
    attempt: u32,
    /// Index in `Model::leases` of the current lease, while LEASED.
    lease: Option<usize>,
    cancel_requested: bool,
    worker_id: String,
    last_error: String,
    result: Vec<u8>,
    progress: Option<u32>,
    /// GetJob's answer when the job became terminal: it must never change again.
    terminal: Option<pb::Job>,
    /// What GetJob answered after the previous step, to check the transition.
    seen: Option<(pb::JobState, u32)>,
}

#[derive(Debug)]
struct ModelLease {
    id: String,
    job: usize,
}

struct Case {
    client: BrokerServiceClient<Channel>,
    db: PgConnection,
    jobs: Vec<ModelJob>,
    leases: Vec<ModelLease>,
    step: usize,
}

fn terminal(state: pb::JobState) -> bool {
    matches!(state, Succeeded | Failed | Cancelled)
}

/// SPEC's state table, as transitions between two observations with one step in between.
fn allowed(from: (pb::JobState, u32), to: (pb::JobState, u32)) -> bool {
    let ((from, a), (to, b)) = (from, to);
    match (from, to) {
        _ if from == to && a == b => true,
        (Queued, Leased) => b == a + 1,
        (Queued, Cancelled) => b == a,
        (Leased, Succeeded | Failed | Cancelled) => b == a,
        // Retry or lease lost keep the attempt; release gives it back.
        (Leased, Queued) => b == a || b + 1 == a,
        _ => false,
    }
}

impl Case {
    fn is_current(&self, lease: usize) -> bool {
        let job = &self.jobs[self.leases[lease].job];
        job.state == Leased && job.lease == Some(lease)
    }

    /// A current lease if `current` and there is one, else any lease ever granted; `None` before the first lease.
    fn pick_lease(&self, index: &Index, current: bool) -> Option<usize> {
        let live: Vec<usize> = (0..self.leases.len()).filter(|&l| self.is_current(l)).collect();
        if current && !live.is_empty() {
            return Some(live[index.index(live.len())]);
        }
        (!self.leases.is_empty()).then(|| index.index(self.leases.len()))
    }

    async fn job(&mut self, job: usize) -> pb::Job {
        let id = self.jobs[job].id.clone();
        get_job(&mut self.client, &id).await
    }

    async fn run(&mut self, op: &Op) {
        match op {
            Op::Enqueue { max_attempts } => self.enqueue(*max_attempts).await,
            Op::Lease { worker } => self.lease(*worker).await,
            Op::Heartbeat { lease, current, percent } => {
                if let Some(lease) = self.pick_lease(lease, *current) {
                    self.heartbeat(lease, *percent).await;
                }
            }
            Op::Complete { lease, current, finish } => {
                if let Some(lease) = self.pick_lease(lease, *current) {
                    self.complete(lease, *finish).await;
                }
            }
            Op::Expire { lease } => {
                if let Some(lease) = self.pick_lease(lease, true).filter(|&l| self.is_current(l)) {
                    self.expire(lease).await;
                }
            }
            Op::Cancel { job, live } => {
                let alive: Vec<usize> = (0..self.jobs.len()).filter(|&j| !terminal(self.jobs[j].state)).collect();
                if *live && !alive.is_empty() {
                    self.cancel(alive[job.index(alive.len())]).await;
                } else if !self.jobs.is_empty() {
                    self.cancel(job.index(self.jobs.len())).await;
                }
            }
        }
    }

    async fn enqueue(&mut self, max_attempts: u32) {
        if self.jobs.len() >= MAX_JOBS {
            return;
        }
        let spec = pb::JobSpec { max_attempts, ..pb::JobSpec::new(QUEUE, "step", format!("job {}", self.jobs.len())) };
        let answer = self.client.enqueue(pb::EnqueueRequest { jobs: vec![spec] }).await.expect("enqueue");
        let enqueued = answer.into_inner().jobs.remove(0);
        assert!(enqueued.created);
        self.jobs.push(ModelJob {
            id: enqueued.id,
            max_attempts,
            state: Queued,
            attempt: 0,
            lease: None,
            cancel_requested: false,
            worker_id: String::new(),
            last_error: String::new(),
            result: Vec::new(),
            progress: None,
            terminal: None,
            seen: None,
        });
    }

    async fn lease(&mut self, worker: usize) {
        let name = WORKERS[worker];
        let mut stream = TestWorker::connect(self.client.clone(), name, &[QUEUE], 1).await;
        if !self.jobs.iter().any(|job| job.state == Queued) {
            // Nothing may be handed out: no job is QUEUED, whatever else exists.
            stream.expect_nothing(Duration::from_millis(50)).await;
            drop(stream);
            self.stream_closed().await;
            return;
        }
        let assignment = stream.assignment(LEASE_WAIT).await;
        drop(stream);
        self.stream_closed().await;
        let leased = assignment.job.expect("an assignment carries its job");
        let job = self.jobs.iter().position(|job| job.id == leased.id);
        let job = job.unwrap_or_else(|| panic!("leased job {} is not one of ours", leased.id));
        let model = &mut self.jobs[job];
        assert_eq!(model.state, Queued, "job {job} was leased while {:?}", model.state);
        assert!(self.leases.iter().all(|l| l.id != assignment.lease_id), "lease id reused");
        assert_eq!(
            (leased.state(), leased.attempt, leased.worker_id.as_str()),
            (Leased, model.attempt + 1, name),
            "the assignment of job {job}"
        );
        assert!(assignment.lease_expires_at.is_some());
        model.state = Leased;
        model.attempt += 1;
        model.lease = Some(self.leases.len());
        model.worker_id = name.into();
        model.progress = None;
        self.leases.push(ModelLease { id: assignment.lease_id, job });
    }

    /// Waits until the broker has closed the stream the test just dropped. Until then the broker may still offer
    /// it a job (the stream is open as far as it knows), and a job it cannot deliver is released: a lease the
    /// model would never see.
    async fn stream_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM worker_sessions")
                .fetch_one(&mut self.db)
                .await
                .expect("counting open streams");
            if open == 0 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the broker did not close a dropped Lease stream");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn heartbeat(&mut self, lease: usize, percent: u32) {
        let job = self.leases[lease].job;
        let before = self.job(job).await;
        let progress = pb::Progress { percent, message: format!("{percent}%") };
        let lease_id = self.leases[lease].id.clone();
        let request = pb::HeartbeatRequest { leases: vec![pb::LeaseBeat { lease_id, progress: Some(progress) }] };
        let status = self.client.heartbeat(request).await.expect("heartbeat").into_inner().leases.remove(0);
        if self.is_current(lease) {
            let model = &mut self.jobs[job];
            assert!(status.active, "the current lease of job {job} was reported inactive");
            assert_eq!(status.cancel_requested, model.cancel_requested, "heartbeat's cancel flag for job {job}");
            model.progress = Some(percent);
        } else {
            assert!(!status.active, "a stale lease of job {job} was reported active");
            assert_eq!(self.job(job).await, before, "a stale heartbeat changed job {job}");
        }
    }

    async fn complete(&mut self, lease: usize, finish: Finish) {
        let job = self.leases[lease].job;
        let before = self.job(job).await;
        let message = format!("failure at step {}", self.step);
        let outcome = match finish {
            Finish::Success => success(message.as_bytes()),
            Finish::RetryNow => failure(&message, false, Some(Duration::from_millis(1))),
            Finish::RetryLater => failure(&message, false, Some(RETRY_LATER)),
            Finish::NonRetryable => failure(&message, true, None),
            Finish::Release => release(),
        };
        let lease_id = self.leases[lease].id.clone();
        let answer = self.client.complete(pb::CompleteRequest { lease_id, outcome: Some(outcome) }).await;
        if !self.is_current(lease) {
            let status = answer.expect_err("a stale lease's Complete must fail");
            assert_eq!(status.code(), Code::Aborted, "stale Complete on job {job}: {status:?}");
            let reason = status.get_error_details().error_info().map(|info| info.reason.clone());
            assert_eq!(reason.as_deref(), Some("LEASE_LOST"), "stale Complete's error reason");
            assert_eq!(self.job(job).await, before, "a stale Complete changed job {job}");
            return;
        }
        let model = &mut self.jobs[job];
        let retryable = matches!(finish, Finish::RetryNow | Finish::RetryLater);
        let next = match finish {
            _ if model.cancel_requested => Cancelled,
            Finish::Success => Succeeded,
            _ if retryable && model.attempt < model.max_attempts => Queued,
            Finish::Release => Queued,
            _ => Failed,
        };
        let answered = answer.unwrap_or_else(|status| panic!("Complete({finish:?}) of job {job}'s lease: {status:?}"));
        assert_eq!(answered.into_inner().state(), next, "Complete({finish:?}) of job {job}");
        if finish == Finish::Release && next == Queued {
            model.attempt -= 1;
        }
        if !matches!(finish, Finish::Success | Finish::Release) {
            model.last_error = message.clone();
        }
        if next == Succeeded {
            model.result = message.into_bytes();
        }
        model.state = next;
        model.lease = None;
        model.cancel_requested = false;
    }

    async fn expire(&mut self, lease: usize) {
        let job = self.leases[lease].job;
        let lease_id: uuid::Uuid = self.leases[lease].id.parse().expect("a lease id is a UUID");
        let moved = sqlx::query(
            "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 second' \
             WHERE lease_id = $1 AND state = 'leased'",
        )
        .bind(lease_id)
        .execute(&mut self.db)
        .await
        .expect("expiring a lease");
        assert_eq!(moved.rows_affected(), 1, "the current lease of job {job} is in the table");
        let id = self.jobs[job].id.clone();
        wait_for(&format!("the reaper to take job {job}'s expired lease"), Duration::from_secs(5), || {
            let (mut client, id) = (self.client.clone(), id.clone());
            async move { (get_job(&mut client, &id).await.state() != Leased).then_some(()) }
        })
        .await;
        let model = &mut self.jobs[job];
        model.state = match () {
            _ if model.cancel_requested => Cancelled,
            _ if model.attempt < model.max_attempts => Queued,
            _ => Failed,
        };
        model.last_error = "lease expired".into();
        model.lease = None;
        model.cancel_requested = false;
    }

    async fn cancel(&mut self, job: usize) {
        let before = self.job(job).await;
        let answer = self.client.cancel_job(pb::CancelJobRequest { id: self.jobs[job].id.clone() }).await;
        let model = &mut self.jobs[job];
        match model.state {
            Queued | Leased => {
                let answered = answer.expect("cancelling a live job").into_inner().job.expect("a job");
                if model.state == Queued {
                    model.state = Cancelled;
                } else {
                    model.cancel_requested = true;
                }
                assert_eq!((answered.state(), answered.cancel_requested), (model.state, model.cancel_requested));
            }
            _ => {
                let status = answer.expect_err("cancelling a terminal job");
                assert_eq!(status.code(), Code::FailedPrecondition, "cancel of a {:?} job: {status:?}", model.state);
                assert_eq!(self.job(job).await, before, "cancelling terminal job {job} changed it");
            }
        }
    }

    /// GetJob agrees with the model on every job, and each change since the last check is one SPEC allows.
    async fn check(&mut self, op: &Op) {
        for index in 0..self.jobs.len() {
            let job = self.job(index).await;
            let model = &mut self.jobs[index];
            let now = (job.state(), job.attempt);
            if let Some(seen) = model.seen {
                assert!(allowed(seen, now), "job {index}: {seen:?} → {now:?} is not in SPEC's table (after {op:?})");
            }
            model.seen = Some(now);
            if let Some(terminal) = &model.terminal {
                assert_eq!(&job, terminal, "terminal job {index} changed (after {op:?})");
                continue;
            }
            let expected = (model.state, model.attempt, model.cancel_requested);
            assert_eq!((job.state(), job.attempt, job.cancel_requested), expected, "job {index} after {op:?}");
            assert_eq!(job.worker_id, model.worker_id, "job {index}'s last holder after {op:?}");
            assert_eq!(job.last_error, model.last_error, "job {index}'s last error after {op:?}");
            assert_eq!(job.result, model.result, "job {index}'s result after {op:?}");
            assert_eq!(job.progress.as_ref().map(|p| p.percent), model.progress, "job {index}'s progress");
            assert_eq!(job.lease_expires_at.is_some(), model.state == Leased, "job {index}'s lease deadline");
            assert_eq!(job.finished_at.is_some(), terminal(model.state), "job {index}'s finish time");
            if terminal(model.state) {
                model.terminal = Some(job);
            }
        }
    }

    /// Each terminal job is recorded once, in `finished_jobs` only; each live job in `jobs` only.
    async fn check_tables(&mut self) {
        for (index, job) in self.jobs.iter().enumerate() {
            let id: uuid::Uuid = job.id.parse().expect("a job id is a UUID");
            let (live, finished): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM jobs WHERE id = $1), (SELECT count(*) FROM finished_jobs WHERE id = $1)",
            )
            .bind(id)
            .fetch_one(&mut self.db)
            .await
            .expect("counting rows");
            let expected = if terminal(job.state) { (0, 1) } else { (1, 0) };
            assert_eq!((live, finished), expected, "rows of job {index} ({:?}) in jobs and finished_jobs", job.state);
        }
    }
}

async fn run_case(ops: Vec<Op>) {
    let database = test_database().await;
    let mut settings = Settings::with_database(database.clone());
    settings.reaper_interval = Duration::from_millis(50);
    settings.poll_interval = Duration::from_millis(250);
    // Dropped lease streams must not shorten their leases: only the test's Expire step ends one.
    settings.reconnect_grace = Duration::from_secs(3600);
    settings.shutdown_grace = Duration::from_secs(1);
    settings.defaults.lease_ttl = Duration::from_secs(60);
    settings.defaults.initial_backoff = Duration::from_millis(20);
    settings.defaults.max_backoff = Duration::from_millis(100);
    let broker = TestBroker::start(settings).await;
    let db = PgConnection::connect(&database).await.expect("connecting to the test database");
    let mut case = Case { client: broker.client().await, db, jobs: Vec::new(), leases: Vec::new(), step: 0 };
    for (step, op) in ops.iter().enumerate() {
        case.step = step;
        case.run(op).await;
        case.check(op).await;
    }
    case.check_tables().await;
    let _ = case.db.close().await;
    broker.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        // The shrunk sequence is printed on failure; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_broker_follows_the_spec_state_table(ops in ops()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(run_case(ops));
    }
}
