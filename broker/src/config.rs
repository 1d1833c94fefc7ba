//! Command line and environment configuration, validated once into [`Settings`].
//!
//! Every flag has an environment variable. [`Settings`] is what the rest of the broker trusts: durations are
//! positive, limits are in range. This module reads nothing from the database and starts nothing.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use jobbroker::tls;

use crate::auth::{Role, Tokens};

/// The longest duration a job may ask for (lease TTL, execution timeout, backoff): 30 days.
pub const MAX_JOB_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Room in a message, besides a job's large fields, for the rest of it (names, ids, key, timestamps, progress,
/// trace context) and the message around it.
const MESSAGE_SLACK: usize = 64 << 10;

#[derive(Debug, Parser)]
#[command(name = "broker", version, about = "jobbroker: a Postgres-backed job broker served over gRPC")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log lines as human-readable text or as JSON objects (one per line), on stdout.
    #[arg(long, env = "JOBBROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Export the broker's spans over OTLP/gRPC to this collector (`http://host:4317`); off when unset. The
    /// standard `OTEL_EXPORTER_OTLP_ENDPOINT` is used when this is not given.
    #[arg(long, env = "JOBBROKER_OTLP_ENDPOINT", value_parser = otlp_endpoint, global = true)]
    pub otlp_endpoint: Option<String>,
}

impl Cli {
    /// Where the broker's spans go: `--otlp-endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` = export off.
    pub fn otlp_collector(&self) -> Result<Option<String>, String> {
        match (&self.otlp_endpoint, std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(endpoint), _) => Ok(Some(endpoint.clone())),
            (None, Ok(endpoint)) if !endpoint.is_empty() => {
                otlp_endpoint(&endpoint).map(Some).map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint}: {e}"))
            }
            _ => Ok(None),
        }
    }
}

/// An OTLP/gRPC collector address: a plaintext `http://` URL (TLS to the collector is not built).
fn otlp_endpoint(text: &str) -> Result<String, String> {
    let uri: tonic::transport::Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(_)) => Ok(text.to_owned()),
        _ => Err("must be an http://host:port URL (TLS to the collector is not supported)".to_owned()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default when no subcommand is given).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Start a private Postgres in a local data directory, migrate it and serve: no database set-up needed.
    Dev(DevArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Data directory of the private Postgres (created on first use). Default: a scratch directory the
    /// `postgres` user can reach when run as root (`/var/tmp/jobbroker/dev-postgres`).
    #[arg(long, env = "JOBBROKER_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TCP port of the private Postgres on 127.0.0.1.
    #[arg(long, env = "JOBBROKER_DEV_PG_PORT", default_value_t = 54329)]
    pub pg_port: u16,
    /// Shell command the local worker agent runs for every job of queue `default` (payload on stdin, result on
    /// stdout). The agent is the `worker-agent` binary next to `broker`.
    #[arg(long, env = "JOBBROKER_DEV_AGENT_EXEC", default_value = "tr a-z A-Z")]
    pub agent_exec: String,
    /// Do not start the local worker agent.
    #[arg(long, env = "JOBBROKER_DEV_NO_AGENT")]
    pub no_agent: bool,
}

/// Flags of the serving broker. Durations are written like `30s`, `500ms`, `5m`, `7d`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Postgres connection URL (required unless `dev`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// gRPC listen address.
    #[arg(long, env = "JOBBROKER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// HTTP listen address of the Prometheus endpoint (`GET /metrics`), or `off`.
    #[arg(long, env = "JOBBROKER_METRICS_LISTEN", default_value = "0.0.0.0:9464")]
    pub metrics_listen: OffOr<SocketAddr>,
    /// Most queues with series of their own in the metrics; queues seen after these are counted under the label
    /// `queue="(other)"`, so producers inventing queue names cannot grow the broker's memory or Prometheus without
    /// bound.
    #[arg(long, env = "JOBBROKER_MAX_METRIC_QUEUES", default_value_t = 1000)]
    pub max_metric_queues: usize,
    /// Largest number of Postgres connections this replica opens.
    #[arg(long, env = "JOBBROKER_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,
    /// How long a request waits for a free database connection before failing UNAVAILABLE.
    #[arg(long, env = "JOBBROKER_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,
    /// Apply migrations at start-up (under an advisory lock, safe with several replicas).
    #[arg(long, env = "JOBBROKER_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Default lease TTL for jobs that do not set one.
    #[arg(long, env = "JOBBROKER_LEASE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// How long the leases of a closed Lease stream survive, waiting for the worker to reconnect.
    #[arg(long, env = "JOBBROKER_RECONNECT_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Duration,
    /// How often the reaper looks for expired leases.
    #[arg(long, env = "JOBBROKER_REAPER_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reaper_interval: Duration,
    /// Safety-net poll for work when no notification arrives (scheduled jobs, missed NOTIFYs).
    #[arg(long, env = "JOBBROKER_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// How soon a change made through another replica reaches `WatchJob` streams on this one: every period, one
    /// statement reads every job watched here (none while nothing is watched).
    #[arg(long, env = "JOBBROKER_WATCH_POLL_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub watch_poll_interval: Duration,
    /// How long terminal jobs are kept before deletion.
    #[arg(long, env = "JOBBROKER_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// How often retention deletes expired jobs.
    #[arg(long, env = "JOBBROKER_RETENTION_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,
    /// Most rows one retention statement deletes.
    #[arg(long, env = "JOBBROKER_RETENTION_BATCH", default_value_t = 1000)]
    pub retention_batch: u32,
    /// Default max_attempts for jobs that do not set one.
    #[arg(long, env = "JOBBROKER_MAX_ATTEMPTS", default_value_t = 25)]
    pub max_attempts: u32,
    /// Default first retry delay.
    #[arg(long, env = "JOBBROKER_INITIAL_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub initial_backoff: Duration,
    /// Default longest retry delay.
    #[arg(long, env = "JOBBROKER_MAX_BACKOFF", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
    /// Default backoff multiplier.
    #[arg(long, env = "JOBBROKER_BACKOFF_MULTIPLIER", default_value_t = 2.0)]
    pub backoff_multiplier: f64,
    /// Largest payload or result, in bytes.
    #[arg(long, env = "JOBBROKER_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20)]
    pub max_payload_bytes: usize,
    /// Most jobs in one Enqueue.
    #[arg(long, env = "JOBBROKER_MAX_JOBS_PER_ENQUEUE", default_value_t = 1000)]
    pub max_jobs_per_enqueue: usize,
    /// Most metadata entries per job.
    #[arg(long, env = "JOBBROKER_MAX_METADATA_ENTRIES", default_value_t = 64)]
    pub max_metadata_entries: usize,
    /// Largest capacity one Lease stream may declare.
    #[arg(long, env = "JOBBROKER_MAX_STREAM_CAPACITY", default_value_t = 10_000)]
    pub max_stream_capacity: u32,
    /// Longest idempotency key, in bytes.
    #[arg(long, env = "JOBBROKER_MAX_IDEMPOTENCY_KEY_BYTES", default_value_t = 256)]
    pub max_idempotency_key_bytes: usize,
    /// Longest metadata (and worker label) key, in bytes.
    #[arg(long, env = "JOBBROKER_MAX_METADATA_KEY_BYTES", default_value_t = 256)]
    pub max_metadata_key_bytes: usize,
    /// Longest metadata (and worker label) value, in bytes.
    #[arg(long, env = "JOBBROKER_MAX_METADATA_VALUE_BYTES", default_value_t = 4096)]
    pub max_metadata_value_bytes: usize,
    /// Most queues one Lease stream may take jobs from.
    #[arg(long, env = "JOBBROKER_MAX_QUEUES_PER_STREAM", default_value_t = 64)]
    pub max_queues_per_stream: usize,
    /// Most leases one Heartbeat may name (the Rust worker library sends at most 1000 per call).
    #[arg(long, env = "JOBBROKER_MAX_LEASES_PER_HEARTBEAT", default_value_t = 1000)]
    pub max_leases_per_heartbeat: usize,
    /// Longest progress message, in bytes (the Rust worker library cuts its messages to 1024).
    #[arg(long, env = "JOBBROKER_MAX_PROGRESS_MESSAGE_BYTES", default_value_t = 1024)]
    pub max_progress_message_bytes: usize,
    /// Longest failure message kept, in bytes; longer ones are cut, not refused (a worker keeps its completion).
    #[arg(long, env = "JOBBROKER_MAX_ERROR_MESSAGE_BYTES", default_value_t = 4096)]
    pub max_error_message_bytes: usize,
    /// Largest page an AdminService listing returns.
    #[arg(long, env = "JOBBROKER_MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: u32,
    /// Most bytes in one AdminService `ListJobs` page (estimated from payloads, results, errors and metadata) or
    /// `ListWorkers` page (from labels, queues and names); a page stops early rather than exceed it. The default
    /// fits the 4 MiB that gRPC clients accept by default.
    #[arg(long, env = "JOBBROKER_MAX_PAGE_BYTES", default_value_t = 4_000_000)]
    pub max_page_bytes: usize,
    /// Largest gRPC message the broker decodes or encodes, in bytes.
    #[arg(long, env = "JOBBROKER_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,
    /// Most jobs written by one group-commit transaction.
    #[arg(long, env = "JOBBROKER_WRITE_BATCH", default_value_t = 5000)]
    pub write_batch: usize,
    /// Concurrent group-commit writers per kind of write (enqueue, completion, heartbeat).
    #[arg(long, env = "JOBBROKER_WRITERS", default_value_t = 2)]
    pub writers: usize,
    /// HTTP/2 keepalive ping interval (also its timeout): half-open connections are closed after about twice this.
    #[arg(long, env = "JOBBROKER_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// How long shutdown waits for in-flight RPCs after closing Lease streams.
    #[arg(long, env = "JOBBROKER_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    // Security and server limits (README: Security).
    /// File of bearer tokens, one `<role> <token>` per line (role: admin, producer or worker; `#` comments).
    /// With no token configured at all, authentication is off.
    #[arg(long, env = "JOBBROKER_TOKENS_FILE", value_name = "PATH")]
    pub tokens_file: Option<PathBuf>,
    /// Admin tokens (comma-separated): every RPC, AdminService included.
    #[arg(long, env = "JOBBROKER_ADMIN_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub admin_tokens: Vec<Secret>,
    /// Producer tokens (comma-separated): Enqueue, GetJob, WatchJob, CancelJob.
    #[arg(long, env = "JOBBROKER_PRODUCER_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub producer_tokens: Vec<Secret>,
    /// Worker tokens (comma-separated): Lease, Heartbeat, Complete.
    #[arg(long, env = "JOBBROKER_WORKER_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub worker_tokens: Vec<Secret>,
    /// Certificate chain (PEM) of the gRPC port; with --tls-key, turns TLS on.
    #[arg(long, env = "JOBBROKER_TLS_CERT", value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "JOBBROKER_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to: requires a client certificate (mutual TLS).
    #[arg(long, env = "JOBBROKER_TLS_CLIENT_CA", value_name = "PATH", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Plaintext gRPC address serving only grpc.health.v1.Health (for probes when the main port has TLS), or `off`.
    #[arg(long, env = "JOBBROKER_HEALTH_LISTEN", default_value = "off")]
    pub health_listen: OffOr<SocketAddr>,
    /// Most concurrent HTTP/2 streams (calls) on one client connection.
    #[arg(long, env = "JOBBROKER_MAX_CONCURRENT_STREAMS", default_value_t = 512)]
    pub max_concurrent_streams: u32,
    /// Connections are closed gracefully after this long, so clients spread over new replicas.
    #[arg(long, env = "JOBBROKER_MAX_CONNECTION_AGE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
    /// Most requests this replica handles at once; beyond it requests fail at once with RESOURCE_EXHAUSTED.
    /// A streaming call counts only while it starts.
    #[arg(long, env = "JOBBROKER_MAX_CONCURRENT_REQUESTS", default_value_t = 2048)]
    pub max_concurrent_requests: usize,
    /// Longest a unary call (or the start of a stream) may take before it is cancelled.
    #[arg(long, env = "JOBBROKER_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Postgres `statement_timeout` of the broker's connections (migrations run without it).
    #[arg(long, env = "JOBBROKER_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub statement_timeout: Duration,
}

/// A command-line secret: parsed like a string, never shown by `Debug`.
#[derive(Clone)]
pub struct Secret(pub String);

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A flag value that is either the word `off` or a `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffOr<T>(pub Option<T>);

impl<T: FromStr> FromStr for OffOr<T>
where
    T::Err: fmt::Display,
{
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(OffOr(None));
        }
        text.parse().map(|value| OffOr(Some(value))).map_err(|e| format!("{e} (or `off`)"))
    }
}

/// Validated configuration of one broker replica.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub listen: SocketAddr,
    pub metrics: MetricsListen,
    pub max_metric_queues: usize,
    pub db_pool_size: u32,
    pub db_acquire_timeout: Duration,
    pub migrate: bool,
    pub reconnect_grace: Duration,
    pub reaper_interval: Duration,
    pub poll_interval: Duration,
    pub watch_poll_interval: Duration,
    pub retention: Duration,
    pub retention_interval: Duration,
    pub retention_batch: u32,
    pub defaults: JobDefaults,
    pub limits: Limits,
    pub write_batch: usize,
    pub writers: usize,
    pub keepalive: Duration,
    pub shutdown_grace: Duration,
    /// Where the plaintext health-only port listens, if anywhere.
    pub health_listen: Option<SocketAddr>,
    pub security: Security,
    pub serving: ServingLimits,
    pub statement_timeout: Duration,
}

/// Who may connect and what they may call.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Empty: authentication is off.
    pub tokens: Tokens,
    /// `None`: the gRPC port is plaintext.
    pub tls: Option<Tls>,
}

/// The gRPC port's certificate and key, and the CA of client certificates (mutual TLS), read and checked at start.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("mutual", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

/// Limits the gRPC server enforces on connections and requests (SPEC: over a limit → RESOURCE_EXHAUSTED).
#[derive(Debug, Clone)]
pub struct ServingLimits {
    pub max_concurrent_streams: u32,
    pub max_connection_age: Duration,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
}

/// Where the Prometheus endpoint listens.
#[derive(Debug, Clone)]
pub enum MetricsListen {
    Off,
    Address(SocketAddr),
    /// A socket bound by the caller (tests bind port 0 and read the port back before serving).
    Bound(Arc<std::net::TcpListener>),
}

/// What a job gets for the fields its spec leaves unset.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDefaults {
    pub lease_ttl: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
}

/// Bounds on what clients may send.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_jobs_per_enqueue: usize,
    pub max_metadata_entries: usize,
    pub max_stream_capacity: u32,
    pub max_message_bytes: usize,
    pub max_idempotency_key_bytes: usize,
    pub max_metadata_key_bytes: usize,
    pub max_metadata_value_bytes: usize,
    pub max_queues_per_stream: usize,
    pub max_leases_per_heartbeat: usize,
    pub max_progress_message_bytes: usize,
    pub max_error_message_bytes: usize,
    pub max_page_size: u32,
    pub max_page_bytes: usize,
}

impl ServeArgs {
    /// Checks every value once; the message names the flag that is wrong.
    pub fn validate(self) -> Result<Settings, String> {
        let database_url = self.database_url.clone().ok_or("--database-url (DATABASE_URL) is required")?;
        let positive = [
            ("--db-acquire-timeout", self.db_acquire_timeout),
            ("--lease-ttl", self.lease_ttl),
            ("--reconnect-grace", self.reconnect_grace),
            ("--reaper-interval", self.reaper_interval),
            ("--poll-interval", self.poll_interval),
            ("--watch-poll-interval", self.watch_poll_interval),
            ("--retention", self.retention),
            ("--retention-interval", self.retention_interval),
            ("--initial-backoff", self.initial_backoff),
            ("--max-backoff", self.max_backoff),
            ("--keepalive", self.keepalive),
            ("--max-connection-age", self.max_connection_age),
            ("--request-timeout", self.request_timeout),
            ("--statement-timeout", self.statement_timeout),
        ];
        for (flag, value) in positive {
            if value.is_zero() {
                return Err(format!("{flag} must be positive"));
            }
        }
        if self.lease_ttl > MAX_JOB_DURATION || self.max_backoff > MAX_JOB_DURATION {
            return Err("--lease-ttl and --max-backoff must be at most 30 days".into());
        }
        if self.initial_backoff > self.max_backoff {
            return Err("--initial-backoff must not exceed --max-backoff".into());
        }
        if !(1.0..=100.0).contains(&self.backoff_multiplier) {
            return Err("--backoff-multiplier must be in 1.0..=100.0".into());
        }
        if !(1..=1000).contains(&self.max_attempts) {
            return Err("--max-attempts must be in 1..=1000".into());
        }
        let counts = [
            ("--db-pool-size", self.db_pool_size as usize),
            ("--retention-batch", self.retention_batch as usize),
            ("--max-payload-bytes", self.max_payload_bytes),
            ("--max-jobs-per-enqueue", self.max_jobs_per_enqueue),
            ("--max-stream-capacity", self.max_stream_capacity as usize),
            ("--max-message-bytes", self.max_message_bytes),
            ("--max-idempotency-key-bytes", self.max_idempotency_key_bytes),
            ("--max-metadata-key-bytes", self.max_metadata_key_bytes),
            ("--max-metadata-value-bytes", self.max_metadata_value_bytes),
            ("--max-queues-per-stream", self.max_queues_per_stream),
            ("--max-leases-per-heartbeat", self.max_leases_per_heartbeat),
            ("--max-progress-message-bytes", self.max_progress_message_bytes),
            ("--max-error-message-bytes", self.max_error_message_bytes),
            ("--max-page-size", self.max_page_size as usize),
            ("--max-page-bytes", self.max_page_bytes),
            ("--write-batch", self.write_batch),
            ("--writers", self.writers),
            ("--max-concurrent-streams", self.max_concurrent_streams as usize),
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-metric-queues", self.max_metric_queues),
        ];
        for (flag, value) in counts {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        // A whole job (payload, result, metadata, last error and the rest) must fit one message, and so must a page.
        let largest_job = 2 * self.max_payload_bytes
            + self.max_metadata_entries * (self.max_metadata_key_bytes + self.max_metadata_value_bytes)
            + self.max_error_message_bytes
            + MESSAGE_SLACK;
        if self.max_message_bytes < largest_job.max(self.max_page_bytes + MESSAGE_SLACK) {
            return Err(format!(
                "--max-message-bytes ({}) must hold the largest job ({largest_job} bytes: twice --max-payload-bytes for \
                 payload and result, full metadata, an error message and {MESSAGE_SLACK} for the rest) and a page of \
                 --max-page-bytes plus {MESSAGE_SLACK}",
                self.max_message_bytes
            ));
        }
        if self.db_pool_size < 4 {
            return Err("--db-pool-size must be at least 4 (listener, reaper and writers each hold one)".into());
        }
        let security = Security { tokens: self.tokens()?, tls: self.tls()? };
        Ok(Settings {
            database_url,
            listen: self.listen,
            metrics: self.metrics_listen.0.map_or(MetricsListen::Off, MetricsListen::Address),
            max_metric_queues: self.max_metric_queues,
            db_pool_size: self.db_pool_size,
            db_acquire_timeout: self.db_acquire_timeout,
            migrate: self.migrate,
            reconnect_grace: self.reconnect_grace,
            reaper_interval: self.reaper_interval,
            poll_interval: self.poll_interval,
            watch_poll_interval: self.watch_poll_interval,
            retention: self.retention,
            retention_interval: self.retention_interval,
            retention_batch: self.retention_batch,
            defaults: JobDefaults {
                lease_ttl: self.lease_ttl,
                max_attempts: self.max_attempts,
                initial_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                backoff_multiplier: self.backoff_multiplier,
            },
            limits: Limits {
                max_payload_bytes: self.max_payload_bytes,
                max_jobs_per_enqueue: self.max_jobs_per_enqueue,
                max_metadata_entries: self.max_metadata_entries,
                max_stream_capacity: self.max_stream_capacity,
                max_message_bytes: self.max_message_bytes,
                max_idempotency_key_bytes: self.max_idempotency_key_bytes,
                max_metadata_key_bytes: self.max_metadata_key_bytes,
                max_metadata_value_bytes: self.max_metadata_value_bytes,
                max_queues_per_stream: self.max_queues_per_stream,
                max_leases_per_heartbeat: self.max_leases_per_heartbeat,
                max_progress_message_bytes: self.max_progress_message_bytes,
                max_error_message_bytes: self.max_error_message_bytes,
                max_page_size: self.max_page_size,
                max_page_bytes: self.max_page_bytes,
            },
            write_batch: self.write_batch,
            writers: self.writers,
            keepalive: self.keepalive,
            shutdown_grace: self.shutdown_grace,
            health_listen: self.health_listen.0,
            security,
            serving: ServingLimits {
                max_concurrent_streams: self.max_concurrent_streams,
                max_connection_age: self.max_connection_age,
                max_concurrent_requests: self.max_concurrent_requests,
                request_timeout: self.request_timeout,
            },
            statement_timeout: self.statement_timeout,
        })
    }

    /// The tokens of --tokens-file and of the --*-tokens flags together.
    fn tokens(&self) -> Result<Tokens, String> {
        let mut tokens = Tokens::default();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --tokens-file {}: {e}", path.display()))?;
            tokens.add_file(&text, path)?;
        }
        let flags = [
            (Role::Admin, "--admin-tokens (JOBBROKER_ADMIN_TOKENS)", &self.admin_tokens),
            (Role::Producer, "--producer-tokens (JOBBROKER_PRODUCER_TOKENS)", &self.producer_tokens),
            (Role::Worker, "--worker-tokens (JOBBROKER_WORKER_TOKENS)", &self.worker_tokens),
        ];
        for (role, flag, list) in flags {
            for Secret(token) in list {
                tokens.add(role, token.trim(), flag)?;
            }
        }
        Ok(tokens)
    }

    /// Reads and checks the TLS files, so a wrong path or a wrong file fails the start naming the flag.
    fn tls(&self) -> Result<Option<Tls>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        let cert_pem = tls::read_certificates("--tls-cert", cert)?;
        let key_pem = tls::read_private_key("--tls-key", key)?;
        let client_ca_pem =
            self.tls_client_ca.as_deref().map(|ca| tls::read_certificates("--tls-client-ca", ca)).transpose()?;
        Ok(Some(Tls { cert_pem, key_pem, client_ca_pem }))
    }
}

impl Settings {
    /// Settings with every default and the given database: what tests and embedders start from. The metrics
    /// endpoint is off (several brokers in one process cannot share its port); set [`Settings::metrics`] to serve it.
    pub fn with_database(database_url: impl Into<String>) -> Settings {
        let cli = Cli::parse_from(["broker", "--database-url", &database_url.into(), "--metrics-listen", "off"]);
        cli.serve.validate().expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_flag() {
        let cli = Cli::parse_from(["broker", "--database-url", "postgres://x", "--lease-ttl", "0s"]);
        assert_eq!(cli.serve.validate().unwrap_err(), "--lease-ttl must be positive");
        let cli = Cli::parse_from(["broker"]);
        assert!(cli.serve.validate().unwrap_err().contains("DATABASE_URL"));
    }

    fn validate(args: &[&str]) -> Result<Settings, String> {
        let cli = Cli::try_parse_from(["broker", "--database-url", "postgres://x"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        cli.serve.validate()
    }

    #[test]
    fn security_and_limit_flags() {
        let defaults = validate(&[]).expect("valid");
        assert!(defaults.security.tokens.is_empty() && defaults.security.tls.is_none());
        assert_eq!(defaults.health_listen, None);
        assert_eq!(defaults.serving.max_concurrent_streams, 512);
        assert_eq!(defaults.serving.max_connection_age, Duration::from_secs(1800));
        assert_eq!(defaults.serving.max_concurrent_requests, 2048);
        assert_eq!(defaults.serving.request_timeout, Duration::from_secs(30));
        assert_eq!(defaults.statement_timeout, Duration::from_secs(30));

        let s = validate(&["--admin-tokens", "a1,a2", "--worker-tokens", "w", "--health-listen", "0.0.0.0:8081"])
            .expect("valid");
        assert_eq!(format!("{:?}", s.security.tokens), "Tokens { admin: 2, producer: 0, worker: 1 }");
        assert_eq!(s.health_listen, Some("0.0.0.0:8081".parse().expect("an address")));
        assert!(!format!("{s:?}").contains("a1"), "settings never show a token");

        let e = validate(&["--health-listen", "nowhere"]).unwrap_err();
        assert!(e.contains("--health-listen") && e.contains("`off`"), "{e}");
        assert_eq!(
            validate(&["--max-concurrent-requests", "0"]).unwrap_err(),
            "--max-concurrent-requests must be at least 1"
        );
        assert_eq!(validate(&["--statement-timeout", "0s"]).unwrap_err(), "--statement-timeout must be positive");
        assert!(validate(&["--tls-cert", "c.pem"]).unwrap_err().contains("--tls-key"));
        let e = validate(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", "k.pem"]).unwrap_err();
        assert!(e.starts_with("cannot read --tls-cert /nonexistent/c.pem:"), "{e}");
        let e = validate(&["--tokens-file", "/nonexistent/tokens"]).unwrap_err();
        assert!(e.starts_with("cannot read --tokens-file /nonexistent/tokens:"), "{e}");
    }

    #[test]
    fn a_whole_job_and_a_page_must_fit_one_message() {
        let defaults = validate(&[]).expect("valid");
        assert_eq!((defaults.limits.max_message_bytes, defaults.limits.max_page_bytes), (16 << 20, 4_000_000));
        let e = validate(&["--max-payload-bytes", "10000000"]).unwrap_err();
        assert!(e.starts_with("--max-message-bytes (16777216) must hold the largest job (20"), "{e}");
        validate(&["--max-payload-bytes", "10000000", "--max-message-bytes", "32000000"]).expect("valid");
        let e = validate(&["--max-page-bytes", "16777216"]).unwrap_err();
        assert!(e.contains("a page of --max-page-bytes"), "{e}");
        validate(&["--max-message-bytes", "4194304", "--max-page-bytes", "3000000"]).expect("valid");
    }

    #[test]
    fn tls_files_are_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("jobbroker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").expect("written");
        let path = not_pem.to_str().expect("UTF-8");
        let e = validate(&["--tls-cert", path, "--tls-key", path]).unwrap_err();
        assert_eq!(e, format!("--tls-cert {path}: no PEM certificate found"));
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }

    #[test]
    fn otlp_endpoint_is_an_http_url() {
        let parse =
            |value: &str| Cli::try_parse_from(["broker", "--otlp-endpoint", value]).map(|cli| cli.otlp_endpoint);
        assert_eq!(parse("http://127.0.0.1:4317").expect("valid"), Some("http://127.0.0.1:4317".to_owned()));
        for bad in ["127.0.0.1:4317", "https://collector:4317", "http://"] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--otlp-endpoint"), "{e}");
        }
    }

    #[test]
    fn metrics_listen_takes_an_address_or_off() {
        let settings = |value: &str| {
            let cli = Cli::try_parse_from(["broker", "--database-url", "postgres://x", "--metrics-listen", value])?;
            Ok::<_, clap::Error>(cli.serve.validate().expect("valid"))
        };
        assert!(matches!(settings("off").unwrap().metrics, MetricsListen::Off));
        let on = settings("127.0.0.1:9999").unwrap().metrics;
        assert!(matches!(on, MetricsListen::Address(a) if a.port() == 9999), "{on:?}");
        let error = settings("9464").unwrap_err().to_string();
        assert!(error.contains("--metrics-listen") && error.contains("`off`"), "{error}");
        let default = Cli::parse_from(["broker", "--database-url", "postgres://x"]).serve.validate().unwrap();
        assert!(matches!(default.metrics, MetricsListen::Address(a) if a.port() == 9464));
    }
}
