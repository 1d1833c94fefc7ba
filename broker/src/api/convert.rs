//! Proto messages in, domain values out (validated, with the offending field named), and back.
//!
//! Every request field SPEC limits is checked here, before anything reaches the domain or the database.
//! Nothing here decides policy; defaults for unset fields are applied by the domain.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use jobbroker::v1 as pb;
use uuid::Uuid;

use crate::{
    config::{Limits, MAX_JOB_DURATION},
    domain::dispatch::Registration,
    error::{Error, Result, Violation},
    model::{Beat, Job, JobState, Outcome, Progress, QueueStats, SpecRequest, TraceContext, WorkerInfo},
};

/// Longest name of a queue or kind (SPEC's name format), and half the longest worker id.
const MAX_NAME: usize = 128;
/// Longest `tracestate` kept (W3C asks vendors to propagate at least 512 characters).
const MAX_TRACESTATE: usize = 512;

/// A field name spelled out only if the field turns out bad (the hot path checks every job of a batch).
struct Lazy<F>(F);

impl<F: FnOnce() -> String> From<Lazy<F>> for String {
    fn from(lazy: Lazy<F>) -> String {
        (lazy.0)()
    }
}

/// Collects every violation of a request, so one answer names all bad fields.
#[derive(Default)]
struct Check(Vec<Violation>);

impl Check {
    fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation::new(field, description));
    }

    fn name(&mut self, field: impl Into<String>, value: &str) {
        let valid = (1..=MAX_NAME).contains(&value.len())
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
        if !valid {
            self.fail(field, format!("must match [A-Za-z0-9_.:-]{{1,{MAX_NAME}}}"));
        }
    }

    fn max_len(&mut self, field: impl Into<String>, len: usize, max: usize) {
        if len > max {
            self.fail(field, format!("must be at most {max} bytes (got {len})"));
        }
    }

    /// Text the store keeps as text: at most `max` bytes and no NUL character (Postgres text cannot hold one).
    fn text(&mut self, field: impl Into<String>, value: &str, max: usize) {
        if value.len() <= max && value.contains('\0') {
            self.fail(field, "must not contain a NUL character");
        } else {
            self.max_len(field, value.len(), max);
        }
    }

    /// An optional duration: unset stays `None`; set must be ≥ 1 ms and ≤ 30 days.
    fn duration(&mut self, field: impl Into<String>, value: Option<&prost_types::Duration>) -> Option<Duration> {
        let value = value?;
        match Duration::try_from(*value) {
            Ok(d) if d < Duration::from_millis(1) => self.fail(field, "must be positive (at least 1ms)"),
            Ok(d) if d > MAX_JOB_DURATION => self.fail(field, "must be at most 30 days"),
            Ok(d) => return Some(d),
            Err(_) => self.fail(field, "must be a positive, well-formed duration"),
        }
        None
    }

    fn done<T>(self, value: T) -> Result<T> {
        if self.0.is_empty() { Ok(value) } else { Err(Error::Invalid(self.0)) }
    }
}

pub fn uuid(field: &str, text: &str) -> Result<Uuid> {
    Uuid::parse_str(text).map_err(|_| Error::invalid(field, format!("must be a UUID (got `{}`)", clip(text))))
}

fn clip(text: &str) -> &str {
    let end = text.char_indices().nth(64).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

fn timestamp(value: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(value.seconds, u32::try_from(value.nanos).ok()?)
}

/// The request's jobs; each carries `trace`, the request's trace context.
pub fn enqueue_request(
    request: pb::EnqueueRequest,
    trace: Option<TraceContext>,
    limits: &Limits,
) -> Result<Vec<SpecRequest>> {
    let mut check = Check::default();
    if request.jobs.is_empty() || request.jobs.len() > limits.max_jobs_per_enqueue {
        check.fail("jobs", format!("must hold 1 to {} jobs (got {})", limits.max_jobs_per_enqueue, request.jobs.len()));
        return check.done(Vec::new());
    }
    let specs = request
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| job_spec(&mut check, i, spec, trace.clone(), limits))
        .collect();
    check.done(specs)
}

/// The W3C trace context of a request (`traceparent` and `tracestate` headers). A missing, repeated or malformed
/// `traceparent` means no trace context (W3C: start a new trace rather than fail); a `tracestate` that is too long
/// or not printable ASCII is dropped while a valid `traceparent` is kept.
pub fn trace_context(headers: &tonic::metadata::MetadataMap) -> Option<TraceContext> {
    let mut values = headers.get_all("traceparent").iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    let traceparent = match value.to_str().ok().filter(|text| valid_traceparent(text)) {
        Some(text) => text.to_owned(),
        None => {
            tracing::debug!(traceparent = ?value, "ignoring a malformed traceparent header");
            return None;
        }
    };
    let tracestate: Vec<&str> = headers.get_all("tracestate").iter().filter_map(|v| v.to_str().ok()).collect();
    let tracestate = tracestate.join(",");
    let tracestate = tracestate.trim();
    let keep = !tracestate.is_empty()
        && tracestate.len() <= MAX_TRACESTATE
        && tracestate.bytes().all(|b| (0x20..=0x7e).contains(&b));
    Some(TraceContext { traceparent, tracestate: keep.then(|| tracestate.to_owned()) })
}

/// The OpenTelemetry parent context of a request's (valid) trace context, read by OpenTelemetry's W3C propagator.
pub fn otel_context(trace: &TraceContext) -> opentelemetry::Context {
    let mut carrier = std::collections::HashMap::from([("traceparent".to_owned(), trace.traceparent.clone())]);
    if let Some(tracestate) = &trace.tracestate {
        carrier.insert("tracestate".to_owned(), tracestate.clone());
    }
    opentelemetry::propagation::TextMapPropagator::extract(
        &opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        &carrier,
    )
}

/// `version-traceid-parentid-flags` in lowercase hex (W3C Trace Context level 1): version `ff` is invalid, ids are
/// not all zeros, version 00 has exactly these four fields and later versions may append `-…`.
fn valid_traceparent(text: &str) -> bool {
    let hex = |field: &str, len: usize| {
        field.len() == len && field.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |field: &str| field.bytes().any(|b| b != b'0');
    let (Some(head), rest) = (text.get(..55), text.get(55..).unwrap_or_default()) else { return false };
    let fields: Vec<&str> = head.split('-').collect();
    let [version, trace_id, parent_id, flags] = fields[..] else { return false };
    hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && nonzero(trace_id)
        && hex(parent_id, 16)
        && nonzero(parent_id)
        && hex(flags, 2)
        && if version == "00" { rest.is_empty() } else { rest.is_empty() || rest.starts_with('-') }
}

fn job_spec(
    check: &mut Check,
    index: usize,
    spec: pb::JobSpec,
    trace: Option<TraceContext>,
    limits: &Limits,
) -> SpecRequest {
    let field = |name: &'static str| Lazy(move || format!("jobs[{index}].{name}"));
    check.name(field("queue"), &spec.queue);
    check.name(field("kind"), &spec.kind);
    check.max_len(field("payload"), spec.payload.len(), limits.max_payload_bytes);
    if !(-1000..=1000).contains(&spec.priority) {
        check.fail(field("priority"), "must be in -1000..=1000");
    }
    let run_at = spec.run_at.as_ref().and_then(|t| {
        // Postgres holds far fewer years than chrono; no one schedules a job outside these.
        let parsed = timestamp(t).filter(|t| (1970..=9999).contains(&t.year()));
        if parsed.is_none() {
            check.fail(field("run_at"), "must be a well-formed timestamp in the years 1970..=9999");
        }
        parsed
    });
    if spec.max_attempts > 1000 {
        check.fail(field("max_attempts"), "must be in 1..=1000 (0 takes the default)");
    }
    check.text(field("idempotency_key"), &spec.idempotency_key, limits.max_idempotency_key_bytes);
    if spec.metadata.len() > limits.max_metadata_entries {
        check.fail(field("metadata"), format!("must have at most {} entries", limits.max_metadata_entries));
    }
    for (key, value) in &spec.metadata {
        if key.is_empty() {
            check.fail(field("metadata"), "keys must not be empty");
        }
        let field = || Lazy(move || format!("jobs[{index}].metadata[{}]", clip(key)));
        check.text(field(), key, limits.max_metadata_key_bytes);
        check.text(field(), value, limits.max_metadata_value_bytes);
    }
    let lease_ttl = check.duration(field("lease_ttl"), spec.lease_ttl.as_ref());
    let execution_timeout = check.duration(field("execution_timeout"), spec.execution_timeout.as_ref());
    let retry = spec.retry.unwrap_or_default();
    let initial_backoff = check.duration(field("retry.initial_backoff"), retry.initial_backoff.as_ref());
    let max_backoff = check.duration(field("retry.max_backoff"), retry.max_backoff.as_ref());
    if let (Some(initial), Some(max)) = (initial_backoff, max_backoff)
        && initial > max
    {
        check.fail(field("retry.initial_backoff"), "must not exceed retry.max_backoff");
    }
    let multiplier = (retry.multiplier != 0.0).then_some(retry.multiplier);
    if multiplier.is_some_and(|m| !(1.0..=100.0).contains(&m)) {
        check.fail(field("retry.multiplier"), "must be in 1.0..=100.0 (0 takes the default)");
    }
    SpecRequest {
        queue: spec.queue,
        kind: spec.kind,
        payload: spec.payload,
        priority: spec.priority,
        run_at,
        max_attempts: (spec.max_attempts != 0).then_some(spec.max_attempts),
        lease_ttl,
        execution_timeout,
        idempotency_key: (!spec.idempotency_key.is_empty()).then_some(spec.idempotency_key),
        initial_backoff,
        max_backoff,
        multiplier,
        metadata: spec.metadata.into_iter().collect(),
        trace,
    }
}

pub fn register(register: pb::Register, limits: &Limits) -> Result<Registration> {
    let mut check = Check::default();
    if register.worker_id.is_empty() {
        check.fail("register.worker_id", "must not be empty");
    }
    check.text("register.worker_id", &register.worker_id, MAX_NAME * 2);
    if register.queues.is_empty() || register.queues.len() > limits.max_queues_per_stream {
        check.fail("register.queues", format!("must name 1 to {} queues", limits.max_queues_per_stream));
    }
    for (i, queue) in register.queues.iter().enumerate() {
        check.name(format!("register.queues[{i}]"), queue);
    }
    if register.capacity > limits.max_stream_capacity {
        check.fail("register.capacity", format!("must be at most {}", limits.max_stream_capacity));
    }
    if register.labels.len() > limits.max_metadata_entries {
        check.fail("register.labels", format!("must have at most {} entries", limits.max_metadata_entries));
    }
    for (key, value) in &register.labels {
        check.text(format!("register.labels[{}]", clip(key)), key, limits.max_metadata_key_bytes);
        check.text(format!("register.labels[{}]", clip(key)), value, limits.max_metadata_value_bytes);
    }
    if register.held_lease_ids.len() > limits.max_stream_capacity as usize {
        check.fail("register.held_lease_ids", format!("must name at most {} leases", limits.max_stream_capacity));
    }
    let held_leases = register
        .held_lease_ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| match Uuid::parse_str(id) {
            Ok(id) => Some(id),
            Err(_) => {
                check.fail(format!("register.held_lease_ids[{i}]"), "must be a UUID");
                None
            }
        })
        .collect();
    check.done(Registration {
        worker_id: register.worker_id,
        queues: register.queues,
        capacity: register.capacity,
        labels: register.labels.into_iter().collect(),
        held_leases,
    })
}

pub fn capacity(capacity: &pb::SetCapacity, limits: &Limits) -> Result<u32> {
    if capacity.capacity > limits.max_stream_capacity {
        return Err(Error::invalid("capacity.capacity", format!("must be at most {}", limits.max_stream_capacity)));
    }
    Ok(capacity.capacity)
}

pub fn heartbeat_request(request: pb::HeartbeatRequest, limits: &Limits) -> Result<Vec<Beat>> {
    let mut check = Check::default();
    if request.leases.is_empty() || request.leases.len() > limits.max_leases_per_heartbeat {
        check.fail("leases", format!("must hold 1 to {} leases", limits.max_leases_per_heartbeat));
    }
    let beats = request
        .leases
        .into_iter()
        .enumerate()
        .filter_map(|(i, beat)| {
            if let Some(progress) = &beat.progress {
                if progress.percent > 100 {
                    check.fail(format!("leases[{i}].progress.percent"), "must be in 0..=100");
                }
                let max = limits.max_progress_message_bytes;
                check.text(format!("leases[{i}].progress.message"), &progress.message, max);
            }
            match Uuid::parse_str(&beat.lease_id) {
                Ok(lease_id) => Some(Beat {
                    lease_id,
                    progress: beat.progress.map(|p| Progress { percent: p.percent, message: p.message }),
                }),
                Err(_) => {
                    check.fail(format!("leases[{i}].lease_id"), "must be a UUID");
                    None
                }
            }
        })
        .collect();
    check.done(beats)
}

pub fn complete_request(request: pb::CompleteRequest, limits: &Limits) -> Result<(Uuid, Outcome)> {
    let lease_id = uuid("lease_id", &request.lease_id)?;
    let mut check = Check::default();
    let outcome = match request.outcome {
        None => {
            check.fail("outcome", "must be one of success, failure or release");
            Outcome::Release
        }
        Some(pb::complete_request::Outcome::Success(success)) => {
            check.max_len("success.result", success.result.len(), limits.max_payload_bytes);
            Outcome::Success { result: success.result }
        }
        Some(pb::complete_request::Outcome::Failure(failure)) => {
            let retry_after = check.duration("failure.retry_after", failure.retry_after.as_ref());
            // A failure is always recorded: its message is cut to size and a NUL (which text cannot hold, and
            // which a command's stderr may well carry) becomes U+FFFD.
            let mut message = failure.message.replace('\0', "\u{FFFD}");
            jobbroker::truncate_utf8(&mut message, limits.max_error_message_bytes);
            Outcome::Failure { message, non_retryable: failure.non_retryable, retry_after }
        }
        Some(pb::complete_request::Outcome::Release(_)) => Outcome::Release,
    };
    check.done((lease_id, outcome))
}

pub fn state(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Leased => pb::JobState::Leased,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn time(value: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: value.timestamp(), nanos: value.timestamp_subsec_nanos() as i32 }
}

pub fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(value).unwrap_or_default()
}

pub fn job(job: Job) -> pb::Job {
    let spec = job.spec;
    pb::Job {
        id: job.id.to_string(),
        spec: Some(pb::JobSpec {
            queue: spec.queue,
            kind: spec.kind,
            payload: spec.payload,
            priority: spec.priority,
            run_at: Some(time(job.run_at)),
            max_attempts: spec.max_attempts,
            lease_ttl: Some(duration(spec.lease_ttl)),
            execution_timeout: spec.execution_timeout.map(duration),
            idempotency_key: spec.idempotency_key.unwrap_or_default(),
            retry: Some(pb::RetryPolicy {
                initial_backoff: Some(duration(spec.retry.initial)),
                max_backoff: Some(duration(spec.retry.max)),
                multiplier: spec.retry.multiplier,
            }),
            metadata: spec.metadata.into_iter().collect(),
        }),
        state: state(job.state).into(),
        attempt: job.attempt,
        created_at: Some(time(job.created_at)),
        run_at: Some(time(job.run_at)),
        worker_id: job.worker_id.unwrap_or_default(),
        lease_expires_at: job.lease_expires_at.map(time),
        finished_at: job.finished_at.map(time),
        last_error: job.last_error.unwrap_or_default(),
        result: job.result.unwrap_or_default(),
        progress: job.progress.map(|p| pb::Progress { percent: p.percent, message: p.message }),
        cancel_requested: job.cancel_requested,
        traceparent: job.trace.as_ref().map(|t| t.traceparent.clone()).unwrap_or_default(),
        tracestate: job.trace.and_then(|t| t.tracestate).unwrap_or_default(),
    }
}

/// A queue name in an admin request.
pub fn queue(field: &str, value: &str) -> Result<()> {
    let mut check = Check::default();
    check.name(field, value);
    check.done(())
}

/// An optional state filter: unspecified is `None`; otherwise one of `allowed`.
pub fn state_filter(field: &str, value: i32, allowed: &[JobState]) -> Result<Option<JobState>> {
    let state = match pb::JobState::try_from(value) {
        Ok(pb::JobState::Unspecified) => return Ok(None),
        Ok(pb::JobState::Queued) => JobState::Queued,
        Ok(pb::JobState::Leased) => JobState::Leased,
        Ok(pb::JobState::Succeeded) => JobState::Succeeded,
        Ok(pb::JobState::Failed) => JobState::Failed,
        Ok(pb::JobState::Cancelled) => JobState::Cancelled,
        Err(_) => return Err(Error::invalid(field, format!("unknown job state {value}"))),
    };
    if !allowed.contains(&state) {
        let names: Vec<&str> = allowed.iter().map(|s| state_name(*s)).collect();
        return Err(Error::invalid(field, format!("must be unspecified or one of {}", names.join(", "))));
    }
    Ok(Some(state))
}

fn state_name(state: JobState) -> &'static str {
    self::state(state).as_str_name()
}

pub fn queue_stats(stats: QueueStats) -> pb::QueueStats {
    pb::QueueStats {
        queue: stats.queue,
        queued: stats.queued,
        scheduled: stats.scheduled,
        leased: stats.leased,
        succeeded: stats.succeeded,
        failed: stats.failed,
        cancelled: stats.cancelled,
        oldest_queued_age: Some(duration(stats.oldest_queued_age)),
        paused: stats.paused,
        max_depth: stats.max_depth.unwrap_or(0),
    }
}

pub fn worker(worker: WorkerInfo) -> pb::WorkerInfo {
    pb::WorkerInfo {
        worker_id: worker.worker_id,
        session_id: worker.session_id.to_string(),
        queues: worker.queues,
        capacity: worker.capacity,
        leases_held: worker.leases_held,
        connected_at: Some(time(worker.connected_at)),
        replica: worker.replica,
        labels: worker.labels.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::{MetadataMap, MetadataValue};

    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (name, value) in pairs {
            map.append(*name, MetadataValue::try_from(*value).expect("an ASCII value"));
        }
        map
    }

    #[test]
    fn traceparent_follows_w3c() {
        assert!(valid_traceparent(VALID));
        assert!(valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert!(!valid_traceparent(bad), "{bad} was accepted");
        }
    }

    #[test]
    fn trace_context_comes_from_the_headers() {
        let trace = trace_context(&headers(&[("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")]));
        let trace = trace.expect("a valid traceparent");
        assert_eq!(trace.traceparent, VALID);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let split = trace_context(&headers(&[("traceparent", VALID), ("tracestate", "a=1"), ("tracestate", "b=2")]));
        assert_eq!(split.and_then(|t| t.tracestate).as_deref(), Some("a=1,b=2"));
        let long = "a=".to_owned() + &"x".repeat(MAX_TRACESTATE);
        let dropped = trace_context(&headers(&[("traceparent", VALID), ("tracestate", &long)])).expect("kept");
        assert_eq!(dropped.tracestate, None);
        assert_eq!(trace_context(&headers(&[])), None);
        assert_eq!(trace_context(&headers(&[("traceparent", "garbage"), ("tracestate", "a=1")])), None);
        assert_eq!(trace_context(&headers(&[("traceparent", VALID), ("traceparent", VALID)])), None);
    }
}
