//! `bench`: drives a real broker over real gRPC and prints what it measured, beside the bar of the performance
//! issue and the database's own limit on the same Postgres.
//!
//! It starts its own durable Postgres (or uses `DATABASE_URL`) and, for each scenario, a fresh database and a
//! broker child process serving it (see [`env`]). Scenarios: the database limit in raw SQL, enqueue, drain,
//! pickup latency, steady state, re-lease after a lost worker, fan-out to idle streams, and drain under a large
//! backlog. `--peer run.sh` runs graphile-worker's benchmark on the same Postgres right after, for ratios.
//! `--smoke` runs everything at toy sizes in seconds (CI). It asserts nothing about speed: it is a measuring
//! instrument, not a test.

mod agent;
mod backlog;
mod drain;
mod enqueue;
mod env;
mod fanout;
mod latency;
mod peer;
mod rawsql;
mod relet;
mod report;
mod steady;
mod usage;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{drain::Workers, env::Env, report::Figure};

#[derive(Debug, Parser)]
#[command(about = "Measure jobbroker: enqueue, drain, latency, steady state, re-lease, fan-out, backlog")]
struct Args {
    #[command(subcommand)]
    child: Option<Child>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Toy sizes, every scenario in seconds (for CI: proves the bench runs, measures nothing).
    #[arg(long)]
    smoke: bool,
    /// Run only these scenarios (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Run every scenario (and the peer) this many times, in rounds, and report each figure's median and range.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    repeat: u32,
    /// Afterwards, run this peer benchmark script (graphile-worker's run.sh) on the same Postgres and report ratios.
    #[arg(long, value_name = "PATH")]
    peer: Option<PathBuf>,
    #[command(flatten)]
    sizes: Sizes,
    /// Measure the worker-agent binary at this path instead (idle RSS, jobs/s through `--exec true` and `--http`).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Jobs per worker-agent run.
    #[arg(long, default_value_t = 2000)]
    agent_jobs: usize,
    /// The worker agent's `--capacity`.
    #[arg(long, default_value_t = 8)]
    agent_capacity: u32,
}

#[derive(Debug, Subcommand)]
enum Child {
    /// Internal: serve as the broker (`broker::run`, as the `broker` binary does); the bench starts itself so.
    #[command(hide = true)]
    Broker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Database,
    Enqueue,
    Drain,
    Pickup,
    Steady,
    Relet,
    Fanout,
    Backlog,
}

/// How much work each scenario does.
#[derive(Debug, Clone, clap::Args)]
struct Sizes {
    /// Jobs drained (and enqueued in batches).
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Single-job Enqueue RPCs (and single-row commits in the database limit).
    #[arg(long, default_value_t = 20_000)]
    single: usize,
    /// Concurrent clients for single-job enqueues.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Worker loops draining (each one connection and one Lease stream).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Capacity of each draining worker loop (4 × 1000 drains about 15 % faster here than 4 × 500: the broker's
    /// claims and completions come in larger batches; see BENCHMARKS.md).
    #[arg(long, default_value_t = 1000)]
    capacity: u32,
    /// Sequential jobs timed for pickup latency.
    #[arg(long, default_value_t = 1000)]
    latency_samples: usize,
    /// Enqueue rate of the steady-state producer, jobs/s.
    #[arg(long, default_value_t = 5000)]
    steady_rate: u32,
    /// Duration of the steady state.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    steady_for: Duration,
    /// How long the producer runs at the same rate before the steady state is measured (a fresh broker's and
    /// Postgres backends' first second is slower; its latency is reported apart).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    steady_warmup: Duration,
    /// Reconnect grace the broker gives a killed worker's leases.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    reconnect_grace: Duration,
    /// Lease TTL of the job a hung worker holds.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    hang_ttl: Duration,
    /// Idle Lease streams in the fan-out scenario.
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// How long the idle broker's CPU is measured with the streams connected.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle_for: Duration,
    /// Jobs already queued in the backlog scenario.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
}

impl Sizes {
    fn smoke() -> Sizes {
        Sizes {
            jobs: 2000,
            single: 500,
            clients: 8,
            workers: 2,
            capacity: 50,
            latency_samples: 20,
            steady_rate: 200,
            steady_for: Duration::from_secs(1),
            steady_warmup: Duration::from_millis(200),
            reconnect_grace: Duration::from_millis(300),
            hang_ttl: Duration::from_millis(300),
            streams: 50,
            idle_for: Duration::from_millis(500),
            backlog: 2000,
        }
    }

    fn workers(&self) -> Workers {
        Workers { count: self.workers, capacity: self.capacity }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Child::Broker { args }) = args.child {
        return serve_broker(args);
    }
    // The worker loops warn "lease lost" for leases they completed while a heartbeat was on its way: noise here.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,jobbroker::worker=error,sqlx=error".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    tokio::runtime::Runtime::new()?.block_on(measure(args))
}

/// The broker child: what the `broker` binary's `main` does (text logs, to stderr: stdout carries the report).
fn serve_broker(args: Vec<String>) -> anyhow::Result<()> {
    use clap::Parser as _;
    let cli = broker::config::Cli::parse_from(std::iter::once("broker".to_owned()).chain(args));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    tokio::runtime::Runtime::new()?.block_on(broker::run(cli))
}

async fn measure(args: Args) -> anyhow::Result<()> {
    let (server_url, _postgres) = env::postgres().await?;
    let sizes = if args.smoke { Sizes::smoke() } else { args.sizes.clone() };
    let mut rounds = Vec::new();
    let mut failed = Vec::new();
    for round in 1..=args.repeat {
        if args.repeat > 1 {
            eprintln!("bench: round {round} of {}", args.repeat);
        }
        let mut figures = Vec::new();
        if let Some(agent) = &args.agent {
            let env = Env::start(&server_url, "agent", &[]).await?;
            figures = agent::run(&env, agent, args.agent_jobs, args.agent_capacity).await?;
            env.finish().await?;
        } else {
            for scenario in Scenario::value_variants() {
                if args.only.is_empty() || args.only.contains(scenario) {
                    // One scenario failing (a broker bug, a timeout) should not hide what the others measured.
                    match run(*scenario, &server_url, &sizes).await {
                        Ok(measured) => figures.extend(measured),
                        Err(error) => failed.push(format!("round {round}, {scenario:?}: {error:#}")),
                    }
                }
            }
        }
        if let Some(script) = &args.peer {
            eprintln!("bench: peer {}…", script.display());
            match peer::run(script, &server_url, sizes.jobs).await {
                Ok(measured) => figures.extend(measured),
                Err(error) => failed.push(format!("round {round}, peer: {error:#}")),
            }
        }
        // Comparisons within the round: only back-to-back figures make a meaningful ratio on a shared machine.
        figures.extend(report::derived(&figures));
        rounds.push(figures);
    }
    report::print(&report::medians(&rounds), args.json);
    anyhow::ensure!(failed.is_empty(), "scenarios failed:\n{}", failed.join("\n"));
    Ok(())
}

/// One scenario against a fresh database and broker.
async fn run(scenario: Scenario, server_url: &str, sizes: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let flags = match scenario {
        Scenario::Relet => {
            vec!["--reconnect-grace".into(), humantime::format_duration(sizes.reconnect_grace).to_string()]
        }
        _ => Vec::new(),
    };
    let env = Env::start(server_url, &format!("{scenario:?}").to_lowercase(), &flags).await?;
    let figures = match scenario {
        Scenario::Database => rawsql::run(&env, sizes.single, sizes.jobs).await,
        Scenario::Enqueue => enqueue::run(&env, sizes.single, sizes.clients, sizes.jobs).await,
        Scenario::Drain => drain::run(&env, sizes.jobs, sizes.workers()).await,
        Scenario::Pickup => latency::run(&env, sizes.latency_samples).await,
        Scenario::Steady => {
            steady::run(&env, sizes.steady_rate, sizes.steady_warmup, sizes.steady_for, sizes.workers()).await
        }
        Scenario::Relet => relet::run(&env, sizes.reconnect_grace, sizes.hang_ttl).await,
        Scenario::Fanout => fanout::run(&env, sizes.streams, sizes.idle_for, sizes.latency_samples).await,
        Scenario::Backlog => backlog::run(&env, sizes.backlog, sizes.jobs, sizes.workers()).await,
    };
    env.finish().await?;
    figures
}
