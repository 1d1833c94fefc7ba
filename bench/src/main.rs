//! `bench`: drives a real broker over real gRPC and prints what it measured.
//!
//! It starts its own durable Postgres (or uses `DATABASE_URL`), creates a fresh database, serves a broker
//! in-process on a free port and runs each scenario against it: enqueue throughput, drain throughput, pickup
//! latency and re-lease time after a killed worker. Figures are printed as a table, or JSON with `--json`.
//! It asserts nothing: it is a measuring instrument, not a test.

mod agent;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use broker::{
    config::Settings,
    devdb::{self, LocalPostgres, PgOptions},
};
use clap::Parser;
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient, lease_request, lease_response};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type Client = BrokerServiceClient<Channel>;

#[derive(Debug, Parser)]
#[command(about = "Measure jobbroker: enqueue and drain throughput, pickup latency, re-lease time")]
struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Jobs in the drain backlog (also the batched-enqueue volume).
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Single-job Enqueue RPCs.
    #[arg(long, default_value_t = 20_000)]
    single: usize,
    /// Concurrent clients for single-job enqueues.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Worker streams draining the backlog.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Capacity of each draining worker stream.
    #[arg(long, default_value_t = 500)]
    capacity: u32,
    /// Sequential jobs timed for pickup latency.
    #[arg(long, default_value_t = 1000)]
    latency_samples: usize,
    /// Reconnect grace the broker gives a killed worker's leases.
    #[arg(long, default_value = "5s", value_parser = humantime_duration)]
    reconnect_grace: Duration,
    /// Measure the worker-agent binary at this path instead (idle RSS, jobs/s through `--exec true` and `--http`).
    #[arg(long, value_name = "PATH")]
    agent: Option<std::path::PathBuf>,
    /// Jobs per worker-agent run.
    #[arg(long, default_value_t = 2000)]
    agent_jobs: usize,
    /// The worker agent's `--capacity`.
    #[arg(long, default_value_t = 8)]
    agent_capacity: u32,
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    let seconds = text.strip_suffix('s').ok_or("use seconds, like 5s")?;
    seconds.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string())
}

/// One measured figure.
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args = Args::parse();
    let (server_url, _postgres) = database().await?;
    let database = format!("bench_{}", std::process::id());
    query(&server_url, &format!("CREATE DATABASE {database}"))?;
    let url = format!("{}/{database}", server_url.rsplit_once('/').map_or(server_url.as_str(), |(base, _)| base));

    let mut settings = Settings::with_database(url.clone());
    settings.reconnect_grace = args.reconnect_grace;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let served = tokio::spawn(broker::serve(listener, settings, stop.clone().cancelled_owned()));
    let mut client = connect(&address).await?;

    let mut figures = Vec::new();
    if let Some(agent) = &args.agent {
        figures = agent::run(&address, &url, agent, args.agent_jobs, args.agent_capacity).await?;
    } else {
        figures.push(enqueue_single(&address, args.single, args.clients).await?);
        figures.push(enqueue_batches(&address, "batch100", args.jobs, 100).await?);
        figures.push(enqueue_batches(&address, "drain", args.jobs, 1000).await?);
        figures.push(drain(&address, "drain", args.jobs, args.workers, args.capacity).await?);
        figures.extend(pickup_latency(&mut client, args.latency_samples).await?);
        figures.push(relelease_after_kill(&address).await?);
    }

    stop.cancel();
    served.await??;
    query(&server_url, &format!("DROP DATABASE {database}"))?;
    report(&figures, args.json);
    Ok(())
}

/// `DATABASE_URL`, or a durable private Postgres started (or reused) in a scratch directory.
async fn database() -> anyhow::Result<(String, Option<LocalPostgres>)> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok((url, None));
    }
    let postgres = tokio::task::spawn_blocking(|| {
        LocalPostgres::start(&devdb::scratch_dir("bench-postgres"), 54340, &PgOptions::default())
    })
    .await??;
    Ok((postgres.url(), Some(postgres)))
}

/// Runs one statement with `psql -tA`; its output (`a|b` for several columns).
fn query(url: &str, sql: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new("psql").args([url, "-tAc", sql]).output().context("running psql")?;
    anyhow::ensure!(output.status.success(), "psql failed: {sql}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

async fn connect(address: &str) -> anyhow::Result<Client> {
    for _ in 0..100 {
        if let Ok(client) = jobbroker::client::connect(address.to_owned()).await {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("cannot connect to the broker at {address}")
}

fn spec(queue: &str, i: usize) -> pb::JobSpec {
    pb::JobSpec::new(queue, "noop", i.to_le_bytes().to_vec())
}

fn rate(name: impl Into<String>, jobs: usize, took: Duration) -> Figure {
    Figure { name: name.into(), value: jobs as f64 / took.as_secs_f64(), unit: "jobs/s" }
}

/// Single-job Enqueue RPCs from `clients` concurrent connections.
async fn enqueue_single(address: &str, total: usize, clients: usize) -> anyhow::Result<Figure> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let mut connected = Vec::new();
    for _ in 0..clients {
        connected.push(connect(address).await?);
    }
    let started = Instant::now();
    for mut client in connected {
        let next = next.clone();
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                client.enqueue(pb::EnqueueRequest { jobs: vec![spec("single", 0)] }).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(rate(format!("enqueue: single-job RPCs, {clients} clients"), total, started.elapsed()))
}

/// Batched Enqueue RPCs of `batch` jobs from 4 concurrent clients.
async fn enqueue_batches(address: &str, queue: &str, total: usize, batch: usize) -> anyhow::Result<Figure> {
    const CLIENTS: usize = 4;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..CLIENTS {
        let (next, mut client, queue) = (next.clone(), connect(address).await?, queue.to_owned());
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= total {
                    return anyhow::Ok(());
                }
                let jobs = (first..(first + batch).min(total)).map(|i| spec(&queue, i)).collect();
                client.enqueue(pb::EnqueueRequest { jobs }).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(rate(format!("enqueue: batches of {batch}, {CLIENTS} clients"), total, started.elapsed()))
}

/// Opens a Lease stream; the returned sender keeps it open.
async fn lease_stream(
    client: &mut Client,
    worker: &str,
    queue: &str,
    capacity: u32,
) -> anyhow::Result<(mpsc::Sender<pb::LeaseRequest>, tonic::Streaming<pb::LeaseResponse>)> {
    let (send, receive) = mpsc::channel(4);
    let register =
        pb::Register { worker_id: worker.into(), queues: vec![queue.into()], capacity, ..Default::default() };
    send.send(pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) }).await?;
    let stream = client.lease(ReceiverStream::new(receive)).await?.into_inner();
    Ok((send, stream))
}

fn success(lease_id: String) -> pb::CompleteRequest {
    pb::CompleteRequest {
        lease_id,
        outcome: Some(pb::complete_request::Outcome::Success(pb::Success { result: Vec::new() })),
    }
}

/// Drains a backlog of `total` jobs with `workers` streams, each completing every job it is given at once.
async fn drain(address: &str, queue: &str, total: usize, workers: usize, capacity: u32) -> anyhow::Result<Figure> {
    let done = Arc::new(AtomicUsize::new(0));
    let finished = CancellationToken::new();
    let first_lease = Arc::new(tokio::sync::OnceCell::new());
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let mut client = connect(address).await?;
        let (_keep, mut stream) = lease_stream(&mut client, &format!("drain-{w}"), queue, capacity).await?;
        let (done, finished, first_lease) = (done.clone(), finished.clone(), first_lease.clone());
        tasks.spawn(async move {
            let _keep = _keep;
            let mut completions = JoinSet::new();
            loop {
                let message = tokio::select! {
                    message = stream.next() => message,
                    () = finished.cancelled() => break,
                };
                let Some(Ok(pb::LeaseResponse { response: Some(lease_response::Response::Assignment(a)) })) = message
                else {
                    continue;
                };
                let _ = first_lease.set(Instant::now());
                let (mut client, done, finished) = (client.clone(), done.clone(), finished.clone());
                completions.spawn(async move {
                    client.complete(success(a.lease_id)).await?;
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == total {
                        finished.cancel();
                    }
                    anyhow::Ok(())
                });
                while let Some(result) = completions.try_join_next() {
                    result??;
                }
            }
            while let Some(result) = completions.join_next().await {
                result??;
            }
            anyhow::Ok(())
        });
    }
    finished.cancelled().await;
    let took = first_lease.get().map_or(Duration::ZERO, |t| t.elapsed());
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(rate(format!("drain: {total} jobs, {workers} streams × capacity {capacity}"), total, took))
}

/// Enqueue → assignment on a waiting worker, one job at a time.
async fn pickup_latency(client: &mut Client, samples: usize) -> anyhow::Result<Vec<Figure>> {
    let (_keep, mut stream) = lease_stream(client, "latency", "latency", 1).await?;
    let mut took = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        client.enqueue(pb::EnqueueRequest { jobs: vec![spec("latency", i)] }).await?;
        let lease_id = loop {
            if let Some(Ok(pb::LeaseResponse { response: Some(lease_response::Response::Assignment(a)) })) =
                stream.next().await
            {
                break a.lease_id;
            }
        };
        took.push(started.elapsed());
        client.complete(success(lease_id)).await?;
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)].as_secs_f64() * 1000.0;
    Ok(vec![
        Figure { name: "pickup latency p50".into(), value: at(0.5), unit: "ms" },
        Figure { name: "pickup latency p99".into(), value: at(0.99), unit: "ms" },
        Figure { name: "pickup latency max".into(), value: at(1.0), unit: "ms" },
    ])
}

/// A worker holding a job vanishes (its stream drops); how long until a waiting worker gets the job.
async fn relelease_after_kill(address: &str) -> anyhow::Result<Figure> {
    let mut doomed = connect(address).await?;
    let (keep, mut stream) = lease_stream(&mut doomed, "doomed", "relelease", 1).await?;
    doomed.enqueue(pb::EnqueueRequest { jobs: vec![spec("relelease", 0)] }).await?;
    stream.next().await.context("the doomed worker's assignment")??;
    let mut rescuer = connect(address).await?;
    let (_keep, mut rescue) = lease_stream(&mut rescuer, "rescuer", "relelease", 1).await?;
    let killed = Instant::now();
    drop((keep, stream, doomed));
    let message = rescue.next().await.context("the rescuer's assignment")??;
    let took = killed.elapsed();
    anyhow::ensure!(matches!(message.response, Some(lease_response::Response::Assignment(_))));
    Ok(Figure { name: "re-lease after a killed worker".into(), value: took.as_secs_f64() * 1000.0, unit: "ms" })
}

fn report(figures: &[Figure], json: bool) {
    if json {
        let rows: Vec<_> =
            figures.iter().map(|f| serde_json::json!({ "name": f.name, "value": f.value, "unit": f.unit })).collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    let width = figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
    for figure in figures {
        println!("{:width$}  {:>12.1} {}", figure.name, figure.value, figure.unit);
    }
}
