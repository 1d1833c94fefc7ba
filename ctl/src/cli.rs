//! The command line: global flags and one subcommand per operation. Parsing only; [`crate::commands`] runs them.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use jobbroker::v1::JobState;

use crate::connect::ConnectArgs;

/// Operate a jobbroker: queues, jobs and workers. Tables by default, `--json` for scripts.
#[derive(Debug, Parser)]
#[command(name = "jobctl", version)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON (one document per line) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every queue's stats.
    Queues,
    /// One queue's stats.
    Stats { queue: String },
    /// A page of a queue's jobs, newest first.
    Jobs(JobsArgs),
    /// One job.
    Get { id: String },
    /// Cancel a job: at once if queued, when its worker stops if leased.
    Cancel { id: String },
    /// Put a FAILED or CANCELLED job back to QUEUED, attempts starting over.
    Retry { id: String },
    /// Put every FAILED (or CANCELLED) job of a queue back to QUEUED.
    RetryAll {
        queue: String,
        #[arg(long, value_enum, default_value_t = DeadState::Failed)]
        state: DeadState,
    },
    /// Delete a queue's finished jobs (all three terminal states unless --state says one).
    Purge {
        queue: String,
        #[arg(long, value_enum)]
        state: Option<TerminalState>,
    },
    /// Stop handing out a queue's jobs (enqueueing still works).
    Pause { queue: String },
    /// Hand out a paused queue's jobs again.
    Resume { queue: String },
    /// Bound how many QUEUED jobs a queue holds (0 removes the bound); enqueues beyond it are refused.
    MaxDepth { queue: String, max_depth: u64 },
    /// Connected workers and the leases they hold.
    Workers {
        /// Only workers taking jobs from this queue.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Add a job to a queue.
    Enqueue(EnqueueArgs),
    /// Follow a job until it finishes; exits 0 if it SUCCEEDED, 3 if it FAILED or was CANCELLED.
    Watch { id: String },
    /// The broker's health (the whole server, or the named services).
    Health {
        /// A service name such as jobbroker.v1.BrokerService; repeatable.
        #[arg(long = "service")]
        services: Vec<String>,
    },
    /// End-to-end check: enqueue a job, lease it on a stream of our own, complete it, read it back SUCCEEDED.
    Smoke {
        /// A queue no other worker consumes.
        #[arg(long, default_value = "jobbroker-smoke")]
        queue: String,
        /// Give up after this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    pub queue: String,
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub state: Option<State>,
    /// Most jobs on the page (1 to 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Where the previous page ended (a page that has more prints the token to pass).
    #[arg(long)]
    pub page_token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// The queue to add it to (created on first use).
    pub queue: String,
    /// Which handler runs the job.
    pub kind: String,
    /// The payload, as given.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file (`-` for stdin).
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Higher runs first (-1000 to 1000).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Run no earlier than this long from now (e.g. 90s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
    /// Enqueueing the same key again returns the first job instead of adding one.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Attempts before the job FAILS for good (default: the broker's).
    #[arg(long)]
    pub max_attempts: Option<u32>,
}

/// A job state, as `--state` takes it.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum State {
    Queued,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
}

/// The states a job can be retried from.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeadState {
    Failed,
    Cancelled,
}

/// The states a purge deletes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TerminalState {
    Succeeded,
    Failed,
    Cancelled,
}

impl From<State> for JobState {
    fn from(state: State) -> JobState {
        match state {
            State::Queued => JobState::Queued,
            State::Leased => JobState::Leased,
            State::Succeeded => JobState::Succeeded,
            State::Failed => JobState::Failed,
            State::Cancelled => JobState::Cancelled,
        }
    }
}

impl From<DeadState> for JobState {
    fn from(state: DeadState) -> JobState {
        match state {
            DeadState::Failed => JobState::Failed,
            DeadState::Cancelled => JobState::Cancelled,
        }
    }
}

impl From<TerminalState> for JobState {
    fn from(state: TerminalState) -> JobState {
        match state {
            TerminalState::Succeeded => JobState::Succeeded,
            TerminalState::Failed => JobState::Failed,
            TerminalState::Cancelled => JobState::Cancelled,
        }
    }
}
