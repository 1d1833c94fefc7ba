//! The broker's vocabulary as plain Rust types: jobs, specs, outcomes, lease facts.
//!
//! Shared by the domain logic and the store. No tonic, no sqlx, no policy: converting from and to proto lives in
//! `api::convert`, deciding what happens to a job lives in `domain`.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Where a job stands; see SPEC's state table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// The spelling stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Leased => "leased",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        [JobState::Queued, JobState::Leased, JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// Backoff between retryable failures: `initial × multiplier^(attempt−1)`, capped at `max`, with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

/// A job spec with every default filled in: what is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub max_attempts: u32,
    pub lease_ttl: Duration,
    pub execution_timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
    pub retry: RetryPolicy,
    pub metadata: BTreeMap<String, String>,
}

/// One job to store, as resolved by the domain from a producer's request.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub spec: JobSpec,
    /// `None`: due now (database clock).
    pub run_at: Option<DateTime<Utc>>,
    pub trace: Option<TraceContext>,
    /// A free slot of a waiting stream on this replica: the insert itself leases the job to it (unless its queue
    /// is paused), so no claim is needed.
    pub lease_to: Option<Slot>,
}

/// The W3C trace context (`traceparent`, `tracestate`) of the Enqueue request that created a job; the worker gets
/// it with the job so its work joins the producer's trace. Validated at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The trace id: the second field of `traceparent` (`version-traceid-parentid-flags`).
    pub fn trace_id(&self) -> &str {
        self.traceparent.split('-').nth(1).unwrap_or_default()
    }
}

/// Progress a worker reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub percent: u32,
    pub message: String,
}

/// A stored job, live or finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub spec: JobSpec,
    pub state: JobState,
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
    pub worker_id: Option<String>,
    pub lease_id: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub result: Option<Vec<u8>>,
    pub progress: Option<Progress>,
    pub cancel_requested: bool,
    /// When the latest lease was granted (database clock); `None` before the first lease and once finished.
    pub leased_at: Option<DateTime<Utc>>,
    pub trace: Option<TraceContext>,
}

/// How a worker ended an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success { result: Vec<u8> },
    Failure { message: String, non_retryable: bool, retry_after: Option<Duration> },
    Release,
}

/// What the store is told to do with one lease, decided by the domain. Fenced by `lease_id` in the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    Succeed {
        result: Vec<u8>,
    },
    /// Back to QUEUED after `delay`, attempt kept.
    Retry {
        delay: Duration,
        error: String,
    },
    /// Dead letter.
    Fail {
        error: String,
    },
    /// Back to QUEUED now, attempt given back.
    Release,
}

/// One lease to settle; `only_if_expired` is set by the reaper so a lease heartbeated meanwhile survives.
#[derive(Debug, Clone)]
pub struct SettleLease {
    pub lease_id: Uuid,
    pub settle: Settle,
    pub only_if_expired: bool,
}

/// The facts the retry policy needs about a leased job.
#[derive(Debug, Clone)]
pub struct LeaseFacts {
    pub lease_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    /// For expired leases: the attempt hit its execution timeout rather than missing heartbeats.
    pub timed_out: bool,
}

/// Where a settled lease's job went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub lease_id: Uuid,
    pub job_id: Uuid,
    pub state: JobState,
    pub queue: String,
    /// How long the lease was held, by the database clock (unknown for leases granted before it was recorded).
    pub held: Option<Duration>,
}

/// One heartbeat for one lease.
#[derive(Debug, Clone)]
pub struct Beat {
    pub lease_id: Uuid,
    pub progress: Option<Progress>,
}

/// A lease's standing after a heartbeat; absent from the answer means the lease is not current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeatAnswer {
    pub lease_id: Uuid,
    pub job_id: Uuid,
    pub lease_expires_at: DateTime<Utc>,
    pub active: bool,
    pub cancel_requested: bool,
}

/// One free slot of a Lease stream, offered to a claim.
#[derive(Debug, Clone)]
pub struct Slot {
    pub session_id: Uuid,
    pub worker_id: String,
}

/// A job as a producer asked for it: unset fields are `None` until the domain applies defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecRequest {
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: Option<u32>,
    pub lease_ttl: Option<Duration>,
    pub execution_timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
    pub initial_backoff: Option<Duration>,
    pub max_backoff: Option<Duration>,
    pub multiplier: Option<f64>,
    pub metadata: BTreeMap<String, String>,
    /// The Enqueue request's trace context; not part of the spec an idempotency key compares.
    pub trace: Option<TraceContext>,
}

/// The answer for one enqueued job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: Uuid,
    pub created: bool,
}

/// A snapshot of one queue, for operators.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    pub queue: String,
    /// QUEUED and due now.
    pub queued: u64,
    /// QUEUED with `run_at` in the future.
    pub scheduled: u64,
    pub leased: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// How long the oldest due QUEUED job has waited since its `run_at`.
    pub oldest_queued_age: Duration,
    pub paused: bool,
    pub max_depth: Option<u64>,
}

/// One connected Lease stream, on any replica.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub session_id: Uuid,
    pub worker_id: String,
    pub queues: Vec<String>,
    pub capacity: u32,
    pub leases_held: u32,
    pub connected_at: DateTime<Utc>,
    pub replica: String,
    pub labels: BTreeMap<String, String>,
}

/// A page of a listing (jobs newest first, workers oldest first); `next` is the id to continue after, if more
/// follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Uuid>,
}

impl<T> Page<T> {
    /// A page of `items`; when `more` follow, the listing continues after the last one's `id`.
    pub fn new(items: Vec<T>, more: bool, id: impl Fn(&T) -> Uuid) -> Page<T> {
        let next = if more { items.last().map(id) } else { None };
        Page { items, next }
    }
}
