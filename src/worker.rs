//! A reusable worker loop: hold a Lease stream, run each assigned job through an async [`Handler`], heartbeat
//! every lease, complete with fencing handled, reconnect with jittered backoff, drain on request.
//!
//! Completions travel on the Lease stream itself (no RPC per job); one whose answer has not arrived when the
//! stream breaks is sent again on the next stream.
//!
//! The loop keeps no state that outlives the process: kill it at any moment and the broker hands its leases to
//! another worker. It knows nothing about how a job runs (that is the handler: a closure, a command, an HTTP call).
//!
//! ```no_run
//! use jobbroker::worker::{self, Outcome, WorkerOptions};
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let options = WorkerOptions::new(["http://127.0.0.1:50051"], ["emails"], 8);
//! let handler = |job: worker::ActiveJob| async move { Outcome::Success(job.payload().to_ascii_uppercase()) };
//! worker::run(options, handler, worker::Control::default()).await?;
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use rand::Rng as _;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Code;
use tracing::Instrument as _;

use crate::{
    client::{BrokerClient as Client, ConnectOptions},
    truncate_utf8,
    v1::{self as pb, lease_request, lease_response},
};

/// Heartbeat period before the broker has said otherwise (it sends `lease_ttl / 3` with each assignment).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Pause between attempts to report a completion while no broker answers.
const COMPLETE_RETRY: Duration = Duration::from_millis(500);
/// How long a leaving worker waits for the broker to end its stream.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest progress message the broker accepts (SPEC limits).
const MAX_PROGRESS_MESSAGE: usize = 1024;
/// Most leases one Heartbeat names (the broker's default `--max-leases-per-heartbeat`) until a broker refuses that
/// many.
const MAX_BEATS: usize = 1000;
/// Range the broker accepts for a failure's `retry_after` (SPEC: durations are 1 ms to 30 days).
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// How the worker connects and what it asks for.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Broker addresses (`http://host:port`, or `https://` for TLS), tried in turn.
    pub brokers: Vec<String>,
    /// Token and TLS settings, the same for every broker.
    pub connect: ConnectOptions,
    /// Identity shown to operators; make it unique per process (hostname plus a per-start id).
    pub worker_id: String,
    pub queues: Vec<String>,
    /// Most jobs running at once.
    pub capacity: u32,
    pub labels: HashMap<String, String>,
    /// Shortest and longest pause between reconnection attempts (jittered, doubling).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl WorkerOptions {
    pub fn new<B: Into<String>, Q: Into<String>>(
        brokers: impl IntoIterator<Item = B>,
        queues: impl IntoIterator<Item = Q>,
        capacity: u32,
    ) -> WorkerOptions {
        WorkerOptions {
            brokers: brokers.into_iter().map(Into::into).collect(),
            connect: ConnectOptions::default(),
            worker_id: default_worker_id(),
            queues: queues.into_iter().map(Into::into).collect(),
            capacity,
            labels: HashMap::new(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// `hostname-<random>`: hostnames repeat (a restarted pod keeps its name), a per-start suffix does not.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{:08x}", rand::rng().random::<u32>())
}

/// How the caller steers a running worker.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Drain: take no new jobs (capacity 0), let running ones finish, then return.
    pub drain: CancellationToken,
    /// Stop now: running jobs are told to stop and released unrun (no attempt used), then return.
    pub abort: CancellationToken,
}

/// How an attempt ended, as the handler reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Vec<u8>),
    Failure {
        message: String,
        non_retryable: bool,
        retry_after: Option<Duration>,
    },
    /// Give the job back unrun (does not use an attempt).
    Release,
}

impl Outcome {
    /// A retryable failure.
    pub fn retry(message: impl Into<String>) -> Outcome {
        Outcome::Failure { message: message.into(), non_retryable: false, retry_after: None }
    }
}

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A client cancelled the job; its outcome is still reported (the broker records CANCELLED).
    Cancelled,
    /// The lease is gone (another worker may run the job); nothing is reported.
    LeaseLost,
    /// The job's execution timeout passed; reported as a retryable failure.
    TimedOut,
    /// The worker is shutting down; the job is released.
    Shutdown,
}

/// One running job as the handler sees it.
#[derive(Clone)]
pub struct ActiveJob {
    inner: Arc<Running>,
}

struct Running {
    lease_id: String,
    job: pb::Job,
    progress: watch::Sender<Option<pb::Progress>>,
    stop: CancellationToken,
    reason: OnceLock<StopReason>,
}

impl ActiveJob {
    pub fn job(&self) -> &pb::Job {
        &self.inner.job
    }

    pub fn id(&self) -> &str {
        &self.inner.job.id
    }

    pub fn lease_id(&self) -> &str {
        &self.inner.lease_id
    }

    fn spec(&self) -> &pb::JobSpec {
        static EMPTY: OnceLock<pb::JobSpec> = OnceLock::new();
        self.inner.job.spec.as_ref().unwrap_or_else(|| EMPTY.get_or_init(pb::JobSpec::default))
    }

    pub fn kind(&self) -> &str {
        &self.spec().kind
    }

    pub fn queue(&self) -> &str {
        &self.spec().queue
    }

    pub fn payload(&self) -> &[u8] {
        &self.spec().payload
    }

    pub fn attempt(&self) -> u32 {
        self.inner.job.attempt
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.spec().metadata
    }

    /// The W3C `traceparent` of the request that enqueued the job, if it carried one: continue that trace
    /// (the agent hands it to commands as `TRACEPARENT` and to HTTP endpoints as the `traceparent` header).
    pub fn traceparent(&self) -> Option<&str> {
        Some(self.inner.job.traceparent.as_str()).filter(|t| !t.is_empty())
    }

    /// The W3C `tracestate` that came with [`Self::traceparent`], if any.
    pub fn tracestate(&self) -> Option<&str> {
        Some(self.inner.job.tracestate.as_str()).filter(|t| !t.is_empty())
    }

    /// The job's execution timeout, if it has one.
    pub fn execution_timeout(&self) -> Option<Duration> {
        self.spec().execution_timeout.and_then(|d| Duration::try_from(d).ok())
    }

    /// Records progress; sent with the next heartbeat. The message is cut to 1 KiB (the broker's default limit; a
    /// heartbeat the broker refuses is sent again without progress, and the progress it carried is dropped).
    pub fn report_progress(&self, percent: u32, message: impl Into<String>) {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_PROGRESS_MESSAGE);
        let progress = pb::Progress { percent: percent.min(100), message };
        self.inner.progress.send_replace(Some(progress));
    }

    /// Resolves when the job should stop (cancelled, lease lost, timed out, shutdown); see [`Self::stop_reason`].
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await;
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.inner.reason.get().copied()
    }

    fn stop(&self, reason: StopReason) {
        if self.inner.reason.set(reason).is_ok() {
            self.inner.stop.cancel();
        }
    }
}

/// Runs one job. Implemented for every `Fn(ActiveJob) -> impl Future<Output = Outcome>`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, job: ActiveJob) -> impl Future<Output = Outcome> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(ActiveJob) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(&self, job: ActiveJob) -> impl Future<Output = Outcome> + Send {
        self(job)
    }
}

/// Completions waiting for their answer on one stream, by lease; `None` once the stream ended.
type Unanswered = Arc<Mutex<Option<HashMap<String, oneshot::Sender<pb::CompleteAnswer>>>>>;

/// The current connection: its client (for heartbeats), and its Lease stream (for completions).
#[derive(Clone)]
struct Link {
    client: Client,
    requests: mpsc::Sender<pb::LeaseRequest>,
    answers: Unanswered,
}

impl Link {
    /// Sends a completion on the stream and waits for its answer; `None` if the stream ended first.
    async fn complete(&self, request: pb::CompleteRequest) -> Option<pb::CompleteAnswer> {
        let (answer, answered) = oneshot::channel();
        self.answers.lock().expect("answers lock").as_mut()?.insert(request.lease_id.clone(), answer);
        let message = pb::LeaseRequest { request: Some(lease_request::Request::Complete(request)) };
        self.requests.send(message).await.ok()?;
        answered.await.ok()
    }

    fn answered(&self, answer: pb::CompleteAnswer) {
        let waiting = self.answers.lock().expect("answers lock").as_mut().and_then(|a| a.remove(&answer.lease_id));
        if let Some(waiting) = waiting {
            let _ = waiting.send(answer);
        }
    }

    /// The stream ended: completions still waiting learn it and are sent again on the next stream.
    fn close(&self) {
        self.answers.lock().expect("answers lock").take();
    }
}

/// The worker's running state, shared by the stream loop, the heartbeat task and the job tasks.
struct Shared {
    options: WorkerOptions,
    running: Mutex<HashMap<String, ActiveJob>>,
    /// The current connection; `None` while reconnecting.
    link: watch::Sender<Option<Link>>,
    /// Heartbeat period the broker asked for (smallest seen).
    heartbeat: Mutex<Duration>,
    /// Woken when a job finishes (drain waits on it) and when a heartbeat is due at once (after reconnecting, or
    /// when an assignment asked for a shorter period).
    job_done: Notify,
    beat_now: Notify,
}

/// Runs the worker until `control.drain` has been honoured (all jobs done) or `control.abort` fired.
pub async fn run<H: Handler>(options: WorkerOptions, handler: H, control: Control) -> Result<(), tonic::Status> {
    if options.brokers.is_empty() || options.queues.is_empty() {
        return Err(tonic::Status::invalid_argument("a worker needs at least one broker address and one queue"));
    }
    let shared = Arc::new(Shared {
        options,
        running: Mutex::default(),
        link: watch::channel(None).0,
        heartbeat: Mutex::new(DEFAULT_HEARTBEAT),
        job_done: Notify::new(),
        beat_now: Notify::new(),
    });
    let handler = Arc::new(handler);
    let tasks = TaskTracker::new();
    let finished = CancellationToken::new();
    tasks.spawn(heartbeats(shared.clone(), finished.clone()));
    {
        let (shared, abort, finished) = (shared.clone(), control.abort.clone(), finished.clone());
        tasks.spawn(async move {
            // Also ends when the worker is done (a drain completed), or `tasks.wait()` below would never return.
            tokio::select! {
                () = abort.cancelled() => {}
                () = finished.cancelled() => return,
            }
            for job in shared.running.lock().expect("running lock").values() {
                job.stop(StopReason::Shutdown);
            }
        });
    }
    let mut backoff = shared.options.reconnect_min;
    let mut turn = 0usize;
    while !done(&shared, &control) {
        let address = &shared.options.brokers[turn % shared.options.brokers.len()];
        turn += 1;
        match session(&shared, &handler, &tasks, &control, address).await {
            Ok(()) => backoff = shared.options.reconnect_min,
            Err(status) => tracing::warn!(broker = %address, %status, "lease stream ended; reconnecting"),
        }
        // A session that got connected starts the backoff over: only consecutive failures lengthen it.
        if let Some(link) = shared.link.send_replace(None) {
            link.close();
            backoff = shared.options.reconnect_min;
        }
        if done(&shared, &control) {
            break;
        }
        let pause = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
        backoff = (backoff * 2).min(shared.options.reconnect_max);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = control.abort.cancelled(), if shared.running.lock().expect("running lock").is_empty() => break,
        }
    }
    finished.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Nothing left to do: asked to stop and no job running.
fn done(shared: &Shared, control: &Control) -> bool {
    (control.drain.is_cancelled() || control.abort.is_cancelled())
        && shared.running.lock().expect("running lock").is_empty()
}

/// One Lease stream: register (adopting jobs still running), take assignments until the stream ends or the
/// worker is done.
async fn session<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    tasks: &TaskTracker,
    control: &Control,
    address: &str,
) -> Result<(), tonic::Status> {
    let mut client = shared.options.connect.connect(address.to_owned()).await.map_err(|e| {
        // The source says why (refused, TLS handshake, certificate); the Display alone is "transport error".
        let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        tonic::Status::unavailable(format!("{e}{cause}"))
    })?;
    // Room for a burst of completions, so the stream writes many per frame.
    let (requests, outbound) = mpsc::channel(1024);
    let draining = control.drain.is_cancelled() || control.abort.is_cancelled();
    let held: Vec<String> = shared.running.lock().expect("running lock").keys().cloned().collect();
    let register = pb::Register {
        worker_id: shared.options.worker_id.clone(),
        queues: shared.options.queues.clone(),
        capacity: if draining { 0 } else { shared.options.capacity },
        labels: shared.options.labels.clone(),
        held_lease_ids: held,
    };
    let _ = requests.send(pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) }).await;
    // A request without a message is the end of the stream (see `leave`).
    let outbound = ReceiverStream::new(outbound).take_while(|request| request.request.is_some());
    let mut inbound = client.lease(outbound).await?.into_inner();
    tracing::info!(broker = %address, worker = %shared.options.worker_id, "connected");
    let link = Link { client, requests, answers: Arc::new(Mutex::new(Some(HashMap::new()))) };
    shared.link.send_replace(Some(link.clone()));
    shared.beat_now.notify_one();
    let mut drain_sent = draining;
    loop {
        if done(shared, control) {
            leave(link, inbound).await;
            return Ok(());
        }
        let message = tokio::select! {
            message = inbound.next() => message,
            () = stopping(control), if !drain_sent => {
                drain_sent = true;
                let capacity = pb::SetCapacity { capacity: 0 };
                let request = pb::LeaseRequest { request: Some(lease_request::Request::Capacity(capacity)) };
                let _ = link.requests.send(request).await;
                continue;
            }
            () = shared.job_done.notified() => continue,
        };
        match message {
            Some(Ok(pb::LeaseResponse { response: Some(lease_response::Response::Assignment(assignment)) })) => {
                let job = start_job(shared, handler, tasks, assignment);
                if control.abort.is_cancelled() {
                    job.stop(StopReason::Shutdown);
                }
            }
            Some(Ok(pb::LeaseResponse { response: Some(lease_response::Response::Completed(answer)) })) => {
                link.answered(answer);
            }
            Some(Ok(pb::LeaseResponse { response: Some(lease_response::Response::Cancel(notice)) })) => {
                if let Some(job) = shared.running.lock().expect("running lock").get(&notice.lease_id) {
                    job.stop(StopReason::Cancelled);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(status)) => return Err(status),
            None => return Err(tonic::Status::unavailable("the broker closed the lease stream")),
        }
    }
}

/// Leaves the broker cleanly: closing the sending side tells it to assign no more and end the stream. An assignment
/// already on its way when the worker stopped arrives meanwhile and is released (no attempt used), where closing
/// the connection would have cost it an attempt and the reconnect grace.
async fn leave(link: Link, mut inbound: tonic::Streaming<pb::LeaseResponse>) {
    let _ = link.requests.send(pb::LeaseRequest { request: None }).await;
    let mut client = link.client;
    let rest = async {
        while let Some(Ok(response)) = inbound.next().await {
            if let Some(lease_response::Response::Assignment(assignment)) = response.response {
                let lease_id = assignment.lease_id;
                let release = pb::CompleteRequest { lease_id, outcome: Some(Outcome::Release.into()) };
                match client.complete(release).await {
                    Ok(_) => tracing::info!("released a job assigned while the worker was stopping"),
                    Err(status) => tracing::warn!(%status, "could not release a job assigned while stopping"),
                }
            }
        }
    };
    if tokio::time::timeout(LEAVE_TIMEOUT, rest).await.is_err() {
        tracing::debug!("the broker did not end the stream in time; leaving anyway");
    }
}

/// Resolves when the worker is asked to drain or abort.
async fn stopping(control: &Control) {
    tokio::select! {
        () = control.drain.cancelled() => {}
        () = control.abort.cancelled() => {}
    }
}

fn start_job<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    tasks: &TaskTracker,
    assignment: pb::Assignment,
) -> ActiveJob {
    let job = assignment.job.unwrap_or_default();
    if let Some(interval) = assignment.heartbeat_interval.and_then(|d| Duration::try_from(d).ok()) {
        let interval = interval.max(Duration::from_millis(50));
        let mut heartbeat = shared.heartbeat.lock().expect("heartbeat lock");
        if interval < *heartbeat {
            *heartbeat = interval;
            // The heartbeat task may be sleeping out the longer period, past this lease's deadline: wake it.
            shared.beat_now.notify_one();
        }
    }
    let span = tracing::info_span!("job", job_id = %job.id, kind = %job.spec.as_ref().map_or("", |s| s.kind.as_str()),
        attempt = job.attempt, lease_id = %assignment.lease_id);
    let active = ActiveJob {
        inner: Arc::new(Running {
            lease_id: assignment.lease_id.clone(),
            job,
            progress: watch::channel(None).0,
            stop: CancellationToken::new(),
            reason: OnceLock::new(),
        }),
    };
    shared.running.lock().expect("running lock").insert(assignment.lease_id, active.clone());
    let (shared, handler, job) = (shared.clone(), handler.clone(), active.clone());
    tasks.spawn(async move { run_job(shared, handler, job).await }.instrument(span));
    active
}

/// Runs the handler (under the job's execution timeout) and reports how it ended.
async fn run_job<H: Handler>(shared: Arc<Shared>, handler: Arc<H>, job: ActiveJob) {
    tracing::info!("job started");
    let timeout = job.execution_timeout();
    let watchdog = {
        let job = job.clone();
        async move {
            match timeout {
                Some(timeout) => {
                    tokio::time::sleep(timeout).await;
                    job.stop(StopReason::TimedOut);
                }
                None => std::future::pending().await,
            }
        }
    };
    // A handler must return soon after `stopped()` fires; the watchdog only asks it to.
    let handled = handler.handle(job.clone());
    tokio::pin!(handled);
    let outcome = tokio::select! {
        outcome = &mut handled => outcome,
        () = watchdog => handled.await,
    };
    let outcome = match job.stop_reason() {
        Some(StopReason::LeaseLost) => None,
        Some(StopReason::Shutdown) => Some(Outcome::Release),
        Some(StopReason::TimedOut) => Some(Outcome::retry("execution timeout exceeded (stopped by the worker)")),
        Some(StopReason::Cancelled) | None => Some(outcome),
    };
    if let Some(outcome) = outcome {
        report(&shared, &job, outcome).await;
    } else {
        tracing::info!("lease lost; dropping the job without reporting");
    }
    shared.running.lock().expect("running lock").remove(job.lease_id());
    shared.job_done.notify_one();
}

/// Completes the lease, retrying through reconnections while no broker answers; a lost lease is dropped.
/// An outcome the broker refuses as invalid (say, a result over its size limit) is replaced once by a
/// non-retryable failure naming the reason, so the job does not sit leased until its lease expires.
async fn report(shared: &Shared, job: &ActiveJob, outcome: Outcome) {
    let mut request = pb::CompleteRequest { lease_id: job.lease_id().to_owned(), outcome: Some(outcome.into()) };
    let mut replaced = false;
    let mut links = shared.link.subscribe();
    loop {
        let link = links.wait_for(Option::is_some).await.ok().and_then(|l| l.clone());
        let Some(link) = link else { return };
        let Some(answer) = link.complete(request.clone()).await else {
            // The stream ended before answering: send it again on the next one.
            if links.changed().await.is_err() {
                return;
            }
            continue;
        };
        let answer = match answer.error_code {
            0 => Ok(answer.state()),
            code => Err(tonic::Status::new(Code::from_i32(code), answer.error_message)),
        };
        match answer {
            Ok(state) => {
                tracing::info!(?state, "job completed");
                return;
            }
            Err(status) if status.code() == Code::Aborted => {
                tracing::info!("lease lost before completion; the result is dropped");
                return;
            }
            Err(status) if transient(&status) => {
                tracing::warn!(%status, "cannot report the completion yet; retrying");
                tokio::time::sleep(COMPLETE_RETRY).await;
            }
            Err(status) if status.code() == Code::InvalidArgument && !replaced => {
                tracing::error!(%status, "the broker refused the outcome; reporting a failure instead");
                let failure = Outcome::Failure {
                    message: format!("the broker refused the outcome: {}", status.message()),
                    non_retryable: true,
                    retry_after: None,
                };
                request.outcome = Some(failure.into());
                replaced = true;
            }
            Err(status) => {
                tracing::error!(%status, "the broker refused the completion");
                return;
            }
        }
    }
}

/// Whether a failed call may succeed if repeated: the broker is unreachable or overloaded, or the connection
/// failed before the broker answered (tonic reports a connection closed mid-call, or a GOAWAY from a broker that
/// is shutting down, as CANCELLED or INTERNAL with the transport error as its source).
fn transient(status: &tonic::Status) -> bool {
    let transport = std::error::Error::source(status).is_some_and(|e| e.is::<tonic::transport::Error>());
    transport
        || matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::ResourceExhausted)
}

impl From<Outcome> for pb::complete_request::Outcome {
    fn from(outcome: Outcome) -> Self {
        use pb::complete_request::Outcome as O;
        match outcome {
            Outcome::Success(result) => O::Success(pb::Success { result }),
            Outcome::Failure { message, non_retryable, retry_after } => O::Failure(pb::Failure {
                message,
                non_retryable,
                // "Retry now" (zero) and "in ten years" are meaningful to a handler but out of the broker's range.
                retry_after: retry_after
                    .map(|d| d.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER))
                    .and_then(|d| prost_types::Duration::try_from(d).ok()),
            }),
            Outcome::Release => O::Release(pb::Release {}),
        }
    }
}

/// Heartbeats every running lease once per period, in slices one call may carry; stops jobs whose lease is gone or
/// cancelled.
///
/// A slice the broker refuses as invalid is sent again without progress: one job's progress message (longer than
/// the broker's `--max-progress-message-bytes`, or text it refuses) must not cost every lease in the slice. The
/// progress it carried is dropped (the slice's jobs send progress again when they report more). If
/// the broker refuses it even so, the slice holds more leases than its `--max-leases-per-heartbeat`: it is sent in
/// halves, and the smaller size is kept for the periods after.
async fn heartbeats(shared: Arc<Shared>, finished: CancellationToken) {
    let mut slice = MAX_BEATS;
    loop {
        let period = *shared.heartbeat.lock().expect("heartbeat lock");
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shared.beat_now.notified() => {}
            () = finished.cancelled() => return,
        }
        let jobs: Vec<ActiveJob> = shared.running.lock().expect("running lock").values().cloned().collect();
        let Some(mut client) = shared.link.borrow().as_ref().map(|link| link.client.clone()) else { continue };
        // Slices still to send, the next one last.
        let mut pending: Vec<&[ActiveJob]> = jobs.chunks(slice).rev().collect();
        while let Some(jobs) = pending.pop() {
            let progress: Vec<_> = jobs.iter().map(|job| job.inner.progress.borrow().clone()).collect();
            let refused = match beat(&mut client, jobs, Some(&progress)).await {
                Err(status) if status.code() == Code::InvalidArgument => status,
                answer => {
                    settle(&shared, jobs, answer);
                    continue;
                }
            };
            let leases = jobs.len();
            tracing::warn!(
                status = %refused,
                leases,
                "the broker refused a heartbeat; sending it again without progress"
            );
            // That progress is not sent again: only progress the jobs report after it.
            for (job, refused) in jobs.iter().zip(progress) {
                job.inner.progress.send_if_modified(|current| {
                    let unchanged = refused.is_some() && *current == refused;
                    if unchanged {
                        *current = None;
                    }
                    unchanged
                });
            }
            match beat(&mut client, jobs, None).await {
                Err(status) if status.code() == Code::InvalidArgument && leases > 1 => {
                    let (first, second) = jobs.split_at(leases.div_ceil(2));
                    slice = slice.min(first.len());
                    tracing::warn!(
                        %status,
                        leases,
                        slice,
                        "the broker refused that many leases in one heartbeat; sending fewer per call"
                    );
                    pending.extend([second, first]);
                }
                answer => settle(&shared, jobs, answer),
            }
        }
    }
}

/// One Heartbeat naming `jobs`' leases, with `progress` (one per job) or without; the statuses in the same order.
async fn beat(
    client: &mut Client,
    jobs: &[ActiveJob],
    progress: Option<&[Option<pb::Progress>]>,
) -> Result<Vec<pb::LeaseStatus>, tonic::Status> {
    let leases = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| pb::LeaseBeat {
            lease_id: job.lease_id().to_owned(),
            progress: progress.and_then(|progress| progress[i].clone()),
        })
        .collect();
    Ok(client.heartbeat(pb::HeartbeatRequest { leases }).await?.into_inner().leases)
}

/// Acts on a Heartbeat's answer for `jobs`: a lost lease stops its job, so does a cancel.
fn settle(shared: &Shared, jobs: &[ActiveJob], answer: Result<Vec<pb::LeaseStatus>, tonic::Status>) {
    let statuses = match answer {
        Ok(statuses) => statuses,
        Err(status) => {
            tracing::warn!(%status, "heartbeat failed; retrying next period");
            return;
        }
    };
    for (job, status) in jobs.iter().zip(statuses) {
        // A job that finished while the heartbeat was in flight: its lease ended with it.
        if !shared.running.lock().expect("running lock").contains_key(job.lease_id()) {
            continue;
        }
        if !status.active {
            tracing::warn!(job_id = %job.id(), "lease lost; stopping the job");
            job.stop(StopReason::LeaseLost);
        } else if status.cancel_requested {
            job.stop(StopReason::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_messages_are_cut_to_what_the_broker_accepts() {
        let mut text = "é".repeat(600); // 1200 bytes
        truncate_utf8(&mut text, MAX_PROGRESS_MESSAGE);
        assert_eq!(text.len(), 1024);
        let mut text = format!("a{}", "é".repeat(600));
        truncate_utf8(&mut text, MAX_PROGRESS_MESSAGE);
        assert_eq!(text.len(), 1023, "never splits a character");
    }

    #[test]
    fn retry_after_is_clamped_into_the_brokers_range() {
        let retry_after = |d: Duration| match pb::complete_request::Outcome::from(Outcome::Failure {
            message: String::new(),
            non_retryable: false,
            retry_after: Some(d),
        }) {
            pb::complete_request::Outcome::Failure(failure) => failure.retry_after.expect("kept"),
            other => panic!("{other:?}"),
        };
        assert_eq!(retry_after(Duration::ZERO), prost_types::Duration { seconds: 0, nanos: 1_000_000 });
        assert_eq!(retry_after(Duration::from_secs(7)), prost_types::Duration { seconds: 7, nanos: 0 });
        assert_eq!(retry_after(Duration::from_secs(u64::MAX / 2)).seconds, 30 * 24 * 3600);
    }
}
