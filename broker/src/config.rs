//! Command line and environment configuration, validated once into [`Settings`].
//!
//! Every flag has an environment variable. [`Settings`] is what the rest of the broker trusts: durations are
//! positive, limits are in range. This module reads nothing from the database and starts nothing.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The longest duration a job may ask for (lease TTL, execution timeout, backoff): 30 days.
pub const MAX_JOB_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

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
    pub metrics_listen: AddressOrOff,
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
}

/// Validated configuration of one broker replica.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub listen: SocketAddr,
    pub metrics: MetricsListen,
    pub db_pool_size: u32,
    pub db_acquire_timeout: Duration,
    pub migrate: bool,
    pub reconnect_grace: Duration,
    pub reaper_interval: Duration,
    pub poll_interval: Duration,
    pub retention: Duration,
    pub retention_interval: Duration,
    pub retention_batch: u32,
    pub defaults: JobDefaults,
    pub limits: Limits,
    pub write_batch: usize,
    pub writers: usize,
    pub keepalive: Duration,
    pub shutdown_grace: Duration,
}

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressOrOff(pub Option<SocketAddr>);

impl FromStr for AddressOrOff {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(AddressOrOff(None));
        }
        text.parse()
            .map(|address| AddressOrOff(Some(address)))
            .map_err(|_| format!("`{text}` is neither an address like 0.0.0.0:9464 nor `off`"))
    }
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
}

impl ServeArgs {
    /// Checks every value once; the message names the flag that is wrong.
    pub fn validate(self) -> Result<Settings, String> {
        let database_url = self.database_url.ok_or("--database-url (DATABASE_URL) is required")?;
        let positive = [
            ("--db-acquire-timeout", self.db_acquire_timeout),
            ("--lease-ttl", self.lease_ttl),
            ("--reconnect-grace", self.reconnect_grace),
            ("--reaper-interval", self.reaper_interval),
            ("--poll-interval", self.poll_interval),
            ("--retention", self.retention),
            ("--retention-interval", self.retention_interval),
            ("--initial-backoff", self.initial_backoff),
            ("--max-backoff", self.max_backoff),
            ("--keepalive", self.keepalive),
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
            ("--write-batch", self.write_batch),
            ("--writers", self.writers),
        ];
        for (flag, value) in counts {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.db_pool_size < 4 {
            return Err("--db-pool-size must be at least 4 (listener, reaper and writers each hold one)".into());
        }
        Ok(Settings {
            database_url,
            listen: self.listen,
            metrics: self.metrics_listen.0.map_or(MetricsListen::Off, MetricsListen::Address),
            db_pool_size: self.db_pool_size,
            db_acquire_timeout: self.db_acquire_timeout,
            migrate: self.migrate,
            reconnect_grace: self.reconnect_grace,
            reaper_interval: self.reaper_interval,
            poll_interval: self.poll_interval,
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
            },
            write_batch: self.write_batch,
            writers: self.writers,
            keepalive: self.keepalive,
            shutdown_grace: self.shutdown_grace,
        })
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
        assert!(error.contains("--metrics-listen") && error.contains("neither an address"), "{error}");
        let default = Cli::parse_from(["broker", "--database-url", "postgres://x"]).serve.validate().unwrap();
        assert!(matches!(default.metrics, MetricsListen::Address(a) if a.port() == 9464));
    }
}
