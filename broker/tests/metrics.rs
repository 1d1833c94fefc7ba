//! The Prometheus endpoint, scraped over HTTP while jobs flow: counters, histograms and gauges move by exactly
//! what happened, and every scrape is well-formed and follows Prometheus naming conventions (checked by `promtool
//! check metrics` when it can be had, and by the checks here in any case).

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use broker::config::Settings;
use common::{
    TestBroker, test_database, wait_for,
    worker::{TestWorker, enqueue, failure, get_job, release},
};
use jobbroker::v1 as pb;
use prometheus_parse::{LineInfo, SampleType, Scrape, Value};

const WAIT: Duration = Duration::from_secs(10);
const QUEUE: &str = "metrics";
/// A queue of its own for the lost lease, so nothing re-delivers it.
const LOST_QUEUE: &str = "metrics-lost";

/// One scrape, checked and parsed.
struct Exposition {
    samples: Vec<prometheus_parse::Sample>,
}

impl Exposition {
    /// The value of the series `name{labels}` (exactly those labels); 0 when absent, as a counter not yet touched.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: HashMap<&str, &str> = labels.iter().copied().collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.metric == name && s.labels.len() == wanted.len())
            .filter(|s| wanted.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                Value::Histogram(_) | Value::Summary(_) => None,
            })
            .collect();
        assert!(found.len() <= 1, "{name}{labels:?} appears {} times", found.len());
        found.first().copied().unwrap_or(0.0)
    }

    /// `jobbroker_queue_jobs` of `queue`: queued, scheduled, leased.
    fn depth(&self, queue: &str) -> [f64; 3] {
        ["queued", "scheduled", "leased"]
            .map(|state| self.value("jobbroker_queue_jobs", &[("queue", queue), ("state", state)]))
    }

    /// How many observations the histogram `name{labels}` holds.
    fn observations(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(&format!("{name}_count"), labels)
    }
}

/// GETs the metrics page and checks it: status, content type, well-formedness and conventions.
async fn scrape(broker: &TestBroker) -> Exposition {
    let response = reqwest::get(&broker.metrics_url).await.expect("the metrics endpoint answers");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let content_type = response.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    assert_eq!(content_type.as_ref().and_then(|v| v.to_str().ok()), Some("text/plain; version=0.0.4"));
    let text = response.text().await.expect("a text body");
    check_conventions(&text);
    let samples = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("a parsable scrape").samples;
    Exposition { samples }
}

/// What `promtool check metrics` enforces, plus ours: every line is HELP, TYPE or a sample; every family is
/// documented and typed once, before its samples; counters and only counters end in `_total`; names are
/// snake_case, `jobbroker_`-prefixed and in base units; histograms are cumulative up to `+Inf` = `_count`; no
/// label value is an id.
fn check_conventions(text: &str) {
    let mut help: HashMap<&str, usize> = HashMap::new();
    let mut types: HashMap<String, SampleType> = HashMap::new();
    let mut buckets: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Empty => {}
            LineInfo::Ignored => panic!("malformed line: {line:?}"),
            LineInfo::Doc { metric_name, doc } => {
                assert!(!doc.trim().is_empty(), "{metric_name} has an empty HELP");
                *help.entry(metric_name).or_default() += 1;
            }
            LineInfo::Type { metric_name, metric_alias, sample_type } => {
                // The parser names a histogram family by its `_bucket` series and keeps the family as the alias.
                let family = metric_alias.unwrap_or(metric_name);
                check_name(&family, sample_type);
                assert!(types.insert(family.clone(), sample_type).is_none(), "{family} typed twice");
            }
            LineInfo::Sample { metric_name, labels, value, timestamp } => {
                assert!(timestamp.is_none(), "{line}: a scrape carries no timestamps");
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}: not a number"));
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| metric_name.strip_suffix(suffix))
                    .find(|base| types.get(*base) == Some(&SampleType::Histogram))
                    .unwrap_or(metric_name);
                let kind = *types.get(family).unwrap_or_else(|| panic!("{line}: no TYPE line before the sample"));
                assert_eq!(help.get(family), Some(&1), "{family} needs exactly one HELP line before its samples");
                let labels = labels.unwrap_or_default();
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    let (label, quoted) = pair.split_once('=').unwrap_or_else(|| panic!("{line}: bad label {pair}"));
                    assert!(snake_case(label), "{line}: label name {label} is not snake_case");
                    let value = quoted.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                    let value = value.unwrap_or_else(|| panic!("{line}: label {label} is not quoted"));
                    assert!(uuid::Uuid::parse_str(value).is_err(), "{line}: an id as a label value");
                    assert!(!label.ends_with("_id") && label != "id", "{line}: an id as a label");
                }
                if kind == SampleType::Counter {
                    assert!(value >= 0.0 && value.fract() == 0.0, "{line}: a counter counts");
                }
                if kind == SampleType::Histogram && metric_name.ends_with("_bucket") {
                    let (series, le) = split_le(labels);
                    buckets.entry(format!("{family}{{{series}}}")).or_default().push((le, value));
                } else if kind == SampleType::Histogram && metric_name.ends_with("_count") {
                    counts.insert(format!("{family}{{{labels}}}"), value);
                }
            }
        }
    }
    for (series, series_buckets) in buckets {
        let values: Vec<f64> = series_buckets.iter().map(|(_, v)| *v).collect();
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{series}: buckets are not cumulative");
        let (last_le, last) = series_buckets.last().expect("a bucket");
        assert_eq!(last_le, "+Inf", "{series}: the last bucket is not +Inf");
        assert_eq!(counts.get(&series), Some(last), "{series}: +Inf bucket differs from _count");
    }
}

fn check_name(name: &str, kind: SampleType) {
    assert!(name.starts_with("jobbroker_") && snake_case(name), "{name}: not a snake_case jobbroker_ name");
    assert!(matches!(kind, SampleType::Counter | SampleType::Gauge | SampleType::Histogram), "{name}: typed {kind:?}");
    let counter = kind == SampleType::Counter;
    assert_eq!(counter, name.ends_with("_total"), "{name} ({kind:?}): only counters end in _total");
    for suffix in ["_count", "_sum", "_bucket"] {
        assert!(!name.ends_with(suffix), "{name}: {suffix} is reserved for histograms");
    }
    // Base units only (promlint: seconds, bytes, ratios; no abbreviations).
    for unit in
        ["millis", "micros", "nanos", "minutes", "hours", "days", "_ms", "_us", "_ns", "kilo", "mega", "percent"]
    {
        assert!(!name.contains(unit), "{name}: not in base units ({unit})");
    }
    if kind == SampleType::Histogram {
        assert!(name.ends_with("_seconds"), "{name}: our histograms measure time in seconds");
    }
}

fn snake_case(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Splits `a="x",le="0.5"` into the labels without `le`, and `le`'s value.
fn split_le(labels: &str) -> (String, String) {
    let (mut rest, mut le) = (Vec::new(), String::new());
    for pair in labels.split(',') {
        match pair.strip_prefix("le=") {
            Some(value) => le = value.trim_matches('"').to_owned(),
            None => rest.push(pair),
        }
    }
    (rest.join(","), le)
}

/// `promtool` (Prometheus' own checker): on the PATH, or taken once from Debian's `prometheus` package into a
/// scratch directory (`apt-get download` and `dpkg-deb`, no root needed; about 20 MB). `None` where neither works.
fn promtool() -> Option<PathBuf> {
    let runs = |path: &PathBuf| Command::new(path).arg("--version").output().is_ok_and(|out| out.status.success());
    let on_path = PathBuf::from("promtool");
    if runs(&on_path) {
        return Some(on_path);
    }
    let tools = broker::devdb::scratch_dir("tools");
    let cached = tools.join("promtool");
    if runs(&cached) {
        return Some(cached);
    }
    // A private download directory next to the cache, so the final rename is atomic even with concurrent tests.
    let download = tools.join(format!("download-{}", uuid::Uuid::new_v4().simple()));
    let script = "apt-get download prometheus >/dev/null 2>&1 && \
                  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool";
    let installed = std::fs::create_dir_all(&download).is_ok()
        && Command::new("sh").args(["-c", script]).current_dir(&download).status().is_ok_and(|s| s.success())
        && std::fs::rename(download.join("usr/bin/promtool"), &cached).is_ok();
    let _ = std::fs::remove_dir_all(&download);
    (installed && runs(&cached)).then_some(cached)
}

/// Runs `promtool check metrics` on the page at `url`, which must pass; says so where promtool cannot be had.
async fn promtool_check(url: &str) {
    let text = reqwest::get(url).await.expect("the metrics endpoint answers").text().await.expect("a text body");
    let Some(promtool) = tokio::task::spawn_blocking(promtool).await.expect("the promtool lookup ran") else {
        eprintln!("promtool is not available (not on PATH, and apt-get download prometheus failed): skipped it");
        return;
    };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("promtool reads the scrape");
    let out = child.wait_with_output().expect("promtool runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}\non:\n{text}");
}

fn spec(queue: &str, kind: &str) -> pb::JobSpec {
    pb::JobSpec::new(queue, kind, kind.as_bytes().to_vec())
}

#[tokio::test]
async fn metrics_follow_jobs_through_the_broker() {
    let mut settings = Settings::with_database(test_database().await);
    settings.reconnect_grace = Duration::from_millis(200);
    settings.reaper_interval = Duration::from_millis(50);
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    let before = scrape(&broker).await;
    let q = [("queue", QUEUE)];
    let lost_q = [("queue", LOST_QUEUE)];
    let moved = |after: &Exposition, name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };

    // Five jobs due now, one scheduled (enqueued twice under one key: counted once), one on the other queue.
    let kinds = ["succeed", "fail", "retry", "release", "cancel"];
    let ids = enqueue(&mut client, kinds.iter().map(|kind| spec(QUEUE, kind)).collect()).await;
    let mut later = spec(QUEUE, "later");
    later.run_at = Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 });
    later.idempotency_key = "later".into();
    for _ in 0..2 {
        enqueue(&mut client, vec![later.clone()]).await;
    }
    enqueue(&mut client, vec![spec(LOST_QUEUE, "lose")]).await;
    let queued = scrape(&broker).await;
    assert_eq!(moved(&queued, "jobbroker_jobs_enqueued_total", &q), 6.0);
    assert_eq!(moved(&queued, "jobbroker_jobs_enqueued_total", &lost_q), 1.0);
    assert_eq!(queued.depth(QUEUE), [5.0, 1.0, 0.0]);
    assert_eq!(queued.depth(LOST_QUEUE), [1.0, 0.0, 0.0]);
    assert!(queued.value("jobbroker_queue_oldest_queued_age_seconds", &q) > 0.0);
    assert_eq!(queued.value("jobbroker_db_pool_max_connections", &[]), 16.0);

    // One worker takes the five due jobs.
    let mut worker = TestWorker::connect(broker.client().await, "w1", &[QUEUE], 5).await;
    let mut leases: HashMap<String, String> = HashMap::new();
    for _ in 0..5 {
        let assignment = worker.assignment(WAIT).await;
        leases.insert(assignment.job.expect("a job").id, assignment.lease_id);
    }
    let lease = |index: usize| leases[&ids[index]].clone();
    let leased = scrape(&broker).await;
    assert_eq!(moved(&leased, "jobbroker_jobs_leased_total", &q), 5.0);
    assert_eq!(leased.observations("jobbroker_pickup_latency_seconds", &q), 5.0);
    assert_eq!(leased.value("jobbroker_workers_connected", &[]), 1.0);
    assert_eq!(leased.depth(QUEUE), [0.0, 1.0, 5.0]);
    assert_eq!(leased.value("jobbroker_queue_oldest_queued_age_seconds", &q), 0.0);
    let pool = |state| leased.value("jobbroker_db_pool_connections", &[("state", state)]);
    assert!(pool("idle") + pool("in_use") >= 1.0, "the broker holds connections");

    // Every outcome once; the released job comes back and succeeds.
    assert_eq!(worker.succeed(&lease(0), b"ok").await.expect("complete"), pb::JobState::Succeeded);
    assert_eq!(worker.complete(&lease(1), failure("bad", true, None)).await.expect("complete"), pb::JobState::Failed);
    let retry = failure("later", false, Some(Duration::from_secs(3600)));
    assert_eq!(worker.complete(&lease(2), retry).await.expect("complete"), pb::JobState::Queued);
    assert_eq!(worker.complete(&lease(3), release()).await.expect("complete"), pb::JobState::Queued);
    let again = worker.assignment(WAIT).await;
    assert_eq!(again.job.as_ref().map(|j| j.id.as_str()), Some(ids[3].as_str()));
    assert_eq!(worker.succeed(&again.lease_id, b"ok").await.expect("complete"), pb::JobState::Succeeded);
    client.cancel_job(pb::CancelJobRequest { id: ids[4].clone() }).await.expect("cancel");
    assert_eq!(worker.succeed(&lease(4), b"ok").await.expect("complete"), pb::JobState::Cancelled);
    // A stale completion changes nothing and counts nothing.
    assert!(worker.succeed(&lease(0), b"twice").await.is_err());

    // The other queue's worker goes away: its lease is lost after the reconnect grace.
    let mut loser = TestWorker::connect(broker.client().await, "w2", &[LOST_QUEUE], 1).await;
    let lost = loser.assignment(WAIT).await.job.expect("a job").id;
    drop(loser);
    let lost_expired = [("queue", LOST_QUEUE), ("reason", "expired")];
    wait_for("the lease to be counted lost", WAIT, || async {
        (scrape(&broker).await.value("jobbroker_leases_lost_total", &lost_expired) == 1.0).then_some(())
    })
    .await;
    assert_eq!(get_job(&mut client, &lost).await.state(), pb::JobState::Queued);

    let after = scrape(&broker).await;
    assert_eq!(moved(&after, "jobbroker_jobs_leased_total", &q), 6.0);
    assert_eq!(moved(&after, "jobbroker_jobs_leased_total", &lost_q), 1.0);
    let completed =
        |outcome| moved(&after, "jobbroker_jobs_completed_total", &[("queue", QUEUE), ("outcome", outcome)]);
    let durations =
        |outcome| after.observations("jobbroker_job_duration_seconds", &[("queue", QUEUE), ("outcome", outcome)]);
    for (outcome, count) in
        [("succeeded", 2.0), ("failed", 1.0), ("retried", 1.0), ("released", 1.0), ("cancelled", 1.0)]
    {
        assert_eq!(completed(outcome), count, "completed {outcome}");
        assert_eq!(durations(outcome), count, "durations of {outcome}");
    }
    assert_eq!(moved(&after, "jobbroker_leases_lost_total", &lost_expired), 1.0);
    assert_eq!(moved(&after, "jobbroker_jobs_completed_total", &[("queue", LOST_QUEUE), ("outcome", "retried")]), 0.0);
    assert_eq!(after.observations("jobbroker_pickup_latency_seconds", &q), 6.0);
    assert_eq!(after.depth(QUEUE), [0.0, 2.0, 0.0], "the retried job waits out its backoff");
    assert_eq!(after.depth(LOST_QUEUE), [1.0, 0.0, 0.0], "the lost lease's job is due again");
    assert!(after.value("jobbroker_queue_oldest_queued_age_seconds", &lost_q) > 0.0);
    assert_eq!(after.value("jobbroker_workers_connected", &[]), 1.0);

    drop(worker);
    wait_for("the worker stream to be counted out", WAIT, || async {
        (scrape(&broker).await.value("jobbroker_workers_connected", &[]) == 0.0).then_some(())
    })
    .await;
    promtool_check(&broker.metrics_url).await;
    broker.stop().await;
}

#[tokio::test]
async fn the_metrics_endpoint_serves_only_metrics_and_stops_with_the_broker() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let _ = broker.client().await;
    let base = broker.metrics_url.trim_end_matches("/metrics").to_owned();
    let other = reqwest::get(format!("{base}/")).await.expect("the metrics port answers");
    assert_eq!(other.status(), reqwest::StatusCode::NOT_FOUND);
    let url = broker.metrics_url.clone();
    broker.stop().await;
    assert!(reqwest::get(&url).await.is_err(), "the metrics endpoint outlived the broker");
}

#[tokio::test]
async fn queues_past_the_metric_limit_share_one_series() {
    let mut settings = Settings::with_database(test_database().await);
    settings.max_metric_queues = 2;
    let broker = TestBroker::start(settings).await;
    let mut client = broker.client().await;
    for queue in ["named-a", "named-b", "extra-c", "extra-c", "extra-d"] {
        enqueue(&mut client, vec![spec(queue, "k")]).await;
    }
    let scraped = scrape(&broker).await;
    let enqueued = |queue| scraped.value("jobbroker_jobs_enqueued_total", &[("queue", queue)]);
    assert_eq!([enqueued("named-a"), enqueued("named-b"), enqueued("(other)")], [1.0, 1.0, 3.0]);
    let names: HashSet<&str> = scraped.samples.iter().filter_map(|s| s.labels.get("queue")).collect();
    assert_eq!(names, HashSet::from(["named-a", "named-b", "(other)"]), "no series of their own past the limit");
    assert_eq!(scraped.depth("(other)"), [3.0, 0.0, 0.0], "the depth gauges add the other queues up");
    assert_eq!(scraped.depth("named-a"), [1.0, 0.0, 0.0]);

    // A worker on an extra queue counts under (other) too.
    let mut worker = TestWorker::connect(broker.client().await, "w", &["extra-d"], 1).await;
    let lease = worker.assignment(WAIT).await.lease_id;
    worker.succeed(&lease, b"").await.expect("succeed");
    let scraped = scrape(&broker).await;
    let completed = [("queue", "(other)"), ("outcome", "succeeded")];
    assert_eq!(scraped.value("jobbroker_jobs_completed_total", &completed), 1.0);
    assert_eq!(scraped.value("jobbroker_jobs_leased_total", &[("queue", "(other)")]), 1.0);
    broker.stop().await;
}
