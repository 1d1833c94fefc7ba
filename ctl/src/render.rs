//! Proto messages shown to people (tables) and to scripts (JSON), and the one switch between the two.
//!
//! JSON uses the proto field names; a job's spec fields (queue, kind, payload…) stand at the top level beside its
//! state. States are short (`"SUCCEEDED"`), timestamps RFC 3339 in UTC, durations in seconds (`"1.5s"`), counts
//! numbers. Bytes (payload, result) appear as `payload` text when they are UTF-8, else as `payload_base64`.
//! Tables show the same facts, rounded for reading. Nothing here calls the broker.

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use jobbroker::v1::{Job, JobState, QueueStats, WorkerInfo};
use serde_json::{Map, Value, json};

use crate::table::Table;

/// Whether a command prints JSON (one compact document per line) or tables.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `json` in JSON mode, else what `human` returns.
    pub fn show(self, json: Value, human: impl FnOnce() -> String) {
        if self.json {
            println!("{json}");
        } else {
            print!("{}", human());
        }
    }
}

/// `QUEUED`, `SUCCEEDED`…: the enum value without its `JOB_STATE_` prefix.
pub fn state_name(state: i32) -> &'static str {
    JobState::try_from(state).map_or("UNKNOWN", |s| s.as_str_name().trim_start_matches("JOB_STATE_"))
}

pub fn job_json(job: &Job) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let mut out = Map::new();
    out.insert("id".into(), json!(job.id));
    out.insert("queue".into(), json!(spec.queue));
    out.insert("kind".into(), json!(spec.kind));
    out.insert("state".into(), json!(state_name(job.state)));
    out.insert("attempt".into(), json!(job.attempt));
    out.insert("max_attempts".into(), json!(spec.max_attempts));
    out.insert("priority".into(), json!(spec.priority));
    insert_bytes(&mut out, "payload", &spec.payload);
    out.insert("idempotency_key".into(), json!(spec.idempotency_key));
    out.insert("metadata".into(), json!(spec.metadata));
    out.insert("lease_ttl".into(), duration_json(spec.lease_ttl.as_ref()));
    out.insert("execution_timeout".into(), duration_json(spec.execution_timeout.as_ref()));
    out.insert("created_at".into(), timestamp_json(job.created_at.as_ref()));
    out.insert("run_at".into(), timestamp_json(job.run_at.as_ref()));
    out.insert("worker_id".into(), json!(job.worker_id));
    out.insert("lease_expires_at".into(), timestamp_json(job.lease_expires_at.as_ref()));
    out.insert("finished_at".into(), timestamp_json(job.finished_at.as_ref()));
    out.insert("cancel_requested".into(), json!(job.cancel_requested));
    out.insert("last_error".into(), json!(job.last_error));
    insert_bytes(&mut out, "result", &job.result);
    let progress = job.progress.as_ref().map(|p| json!({"percent": p.percent, "message": p.message}));
    out.insert("progress".into(), progress.unwrap_or(Value::Null));
    Value::Object(out)
}

/// One job as `field  value` lines, leaving out what is unset.
pub fn job_fields(job: &Job) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    let mut fields = vec![
        ("id", job.id.clone()),
        ("queue", spec.queue),
        ("kind", spec.kind),
        ("state", state_name(job.state).to_owned() + if job.cancel_requested { " (cancel requested)" } else { "" }),
        ("attempt", format!("{} of {}", job.attempt, spec.max_attempts)),
        ("priority", spec.priority.to_string()),
        ("created", timestamp_text(job.created_at.as_ref())),
        ("run at", timestamp_text(job.run_at.as_ref())),
        ("worker", job.worker_id.clone()),
        ("lease until", timestamp_text(job.lease_expires_at.as_ref())),
        ("finished", timestamp_text(job.finished_at.as_ref())),
        ("idempotency key", spec.idempotency_key),
        ("last error", job.last_error.clone()),
        ("payload", bytes_text(&spec.payload)),
        ("result", bytes_text(&job.result)),
    ];
    if let Some(progress) = job.progress.as_ref().filter(|p| p.percent > 0 || !p.message.is_empty()) {
        fields.push(("progress", format!("{}% {}", progress.percent, progress.message).trim_end().to_owned()));
    }
    let mut metadata: Vec<_> = spec.metadata.into_iter().collect();
    metadata.sort();
    for (key, value) in metadata {
        fields.push(("metadata", format!("{key}={value}")));
    }
    let mut table = Table::new(&[]);
    for (name, value) in fields.into_iter().filter(|(_, value)| !value.is_empty() && value != "-") {
        table.row(vec![name.to_owned(), value]);
    }
    table.render()
}

pub fn jobs_table(jobs: &[Job]) -> String {
    let mut table = Table::new(&["ID", "STATE", "KIND", "ATTEMPT", "PRIORITY", "CREATED", "RUN AT", "LAST ERROR"]);
    for job in jobs {
        let spec = job.spec.clone().unwrap_or_default();
        table.row(vec![
            job.id.clone(),
            state_name(job.state).to_owned(),
            spec.kind,
            format!("{}/{}", job.attempt, spec.max_attempts),
            spec.priority.to_string(),
            timestamp_text(job.created_at.as_ref()),
            timestamp_text(job.run_at.as_ref()),
            job.last_error.lines().next().unwrap_or_default().to_owned(),
        ]);
    }
    table.render()
}

pub fn stats_json(stats: &QueueStats) -> Value {
    json!({
        "queue": stats.queue,
        "queued": stats.queued,
        "scheduled": stats.scheduled,
        "leased": stats.leased,
        "succeeded": stats.succeeded,
        "failed": stats.failed,
        "cancelled": stats.cancelled,
        "oldest_queued_age": duration_json(stats.oldest_queued_age.as_ref()),
        "paused": stats.paused,
        "max_depth": stats.max_depth,
    })
}

pub fn stats_table(queues: &[QueueStats]) -> String {
    let mut table = Table::new(&[
        "QUEUE",
        "QUEUED",
        "SCHEDULED",
        "LEASED",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "OLDEST",
        "PAUSED",
        "MAX DEPTH",
    ]);
    for stats in queues {
        let oldest = stats.oldest_queued_age.and_then(|age| Duration::try_from(age).ok()).unwrap_or_default();
        table.row(vec![
            stats.queue.clone(),
            stats.queued.to_string(),
            stats.scheduled.to_string(),
            stats.leased.to_string(),
            stats.succeeded.to_string(),
            stats.failed.to_string(),
            stats.cancelled.to_string(),
            if oldest.is_zero() { "-".into() } else { age_text(oldest) },
            if stats.paused { "yes" } else { "no" }.into(),
            if stats.max_depth == 0 { "-".into() } else { stats.max_depth.to_string() },
        ]);
    }
    table.render()
}

pub fn worker_json(worker: &WorkerInfo) -> Value {
    json!({
        "worker_id": worker.worker_id,
        "session_id": worker.session_id,
        "queues": worker.queues,
        "capacity": worker.capacity,
        "leases_held": worker.leases_held,
        "connected_at": timestamp_json(worker.connected_at.as_ref()),
        "replica": worker.replica,
        "labels": worker.labels,
    })
}

pub fn workers_table(workers: &[WorkerInfo]) -> String {
    let mut table = Table::new(&["WORKER", "QUEUES", "LEASES", "CONNECTED", "REPLICA", "LABELS"]);
    for worker in workers {
        let mut labels: Vec<_> = worker.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        table.row(vec![
            worker.worker_id.clone(),
            worker.queues.join(","),
            format!("{}/{}", worker.leases_held, worker.capacity),
            timestamp_text(worker.connected_at.as_ref()),
            worker.replica.clone(),
            labels.join(","),
        ]);
    }
    table.render()
}

/// A duration as seconds with no more fractional digits than needed: `"1.5s"`, `"30s"`, `"0.000001s"`.
pub fn duration_text(duration: Duration) -> String {
    let nanos = duration.subsec_nanos();
    if nanos == 0 {
        return format!("{}s", duration.as_secs());
    }
    let fraction = format!("{nanos:09}");
    format!("{}.{}s", duration.as_secs(), fraction.trim_end_matches('0'))
}

fn duration_json(duration: Option<&prost_types::Duration>) -> Value {
    duration.and_then(|d| Duration::try_from(*d).ok()).map_or(Value::Null, |d| json!(duration_text(d)))
}

/// A duration for reading, one word for `awk`: whole seconds (`3m12s`), or milliseconds below one second.
fn age_text(duration: Duration) -> String {
    let rounded = if duration < Duration::from_secs(1) {
        Duration::from_millis(duration.as_millis() as u64)
    } else {
        Duration::from_secs(duration.as_secs())
    };
    humantime::format_duration(rounded).to_string().replace(' ', "")
}

fn datetime(timestamp: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    DateTime::from_timestamp(timestamp.seconds, u32::try_from(timestamp.nanos).ok()?)
}

fn timestamp_json(timestamp: Option<&prost_types::Timestamp>) -> Value {
    datetime(timestamp).map_or(Value::Null, |t| json!(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
}

/// To the second, or `-` when unset.
fn timestamp_text(timestamp: Option<&prost_types::Timestamp>) -> String {
    datetime(timestamp).map_or_else(|| "-".into(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

fn insert_bytes(out: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match text_or_base64(bytes) {
        Ok(text) => out.insert(name.into(), json!(text)),
        Err(base64) => out.insert(format!("{name}_base64"), json!(base64)),
    };
}

fn bytes_text(bytes: &[u8]) -> String {
    text_or_base64(bytes).unwrap_or_else(|base64| format!("base64:{base64}"))
}

/// The bytes as text when they are UTF-8, else base64-encoded as the error.
fn text_or_base64(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_as_few_digits_as_needed() {
        assert_eq!(duration_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(duration_text(Duration::from_secs(30)), "30s");
        assert_eq!(duration_text(Duration::from_micros(1)), "0.000001s");
    }

    #[test]
    fn bytes_are_text_when_utf8_else_base64() {
        let job = Job { result: vec![0xff, 0x00], ..Job::default() };
        let json = job_json(&job);
        assert_eq!(json["payload"], "");
        assert_eq!(json["result_base64"], "/wA=");
        assert!(json.get("result").is_none());
    }
}
