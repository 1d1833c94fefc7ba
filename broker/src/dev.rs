//! `broker dev`: everything on one machine with no set-up — a private Postgres, the broker, a local worker agent
//! running a shell command, and one demo job sent through them so the whole path is seen working.
//!
//! For trying jobbroker out and for local development only; production runs `broker serve` against a real database
//! and worker agents deployed on their own.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use jobbroker::v1 as pb;
use tokio::process::{Child, Command};

use crate::{
    config::{DevArgs, ServeArgs},
    devdb, server,
};

/// Queue the local agent works and the demo job goes to.
const DEV_QUEUE: &str = "default";

/// How long the local agent's running jobs may take to finish once `dev` is told to stop.
const AGENT_DRAIN_GRACE: Duration = Duration::from_secs(10);

pub async fn run(mut serve_args: ServeArgs, args: DevArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(|| devdb::scratch_dir("dev-postgres"));
    let (dir, port) = (data_dir.clone(), args.pg_port);
    let postgres =
        tokio::task::spawn_blocking(move || devdb::LocalPostgres::start(&dir, port, &devdb::PgOptions::default()))
            .await
            .context("the Postgres launcher panicked")??;
    serve_args.database_url = Some(postgres.url());
    let settings = serve_args.validate().map_err(anyhow::Error::msg)?;
    let address = settings.listen;
    println!("jobbroker dev: Postgres at {} (data in {}); gRPC on {address}", postgres.url(), data_dir.display());
    let agent = if args.no_agent { None } else { start_agent(address, &args.agent_exec)? };
    if agent.is_some() {
        tokio::spawn(demo(address, args.agent_exec.clone()));
    }
    // On SIGTERM or Ctrl-C the agent drains first, its running jobs completing through the broker, which still
    // serves; then the broker stops.
    let shutdown = async move {
        server::termination().await;
        if let Some(agent) = agent {
            stop_agent(agent).await;
        }
    };
    let served = super::serve_until(settings, shutdown).await;
    if let Err(error) = tokio::task::spawn_blocking(move || postgres.stop()).await? {
        tracing::warn!(%error, "could not stop the dev Postgres");
    }
    served
}

/// The `worker-agent` binary built next to this one, if any.
fn agent_binary() -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.with_file_name("worker-agent");
    path.is_file().then_some(path)
}

fn start_agent(address: SocketAddr, exec: &str) -> anyhow::Result<Option<Child>> {
    let Some(binary) = agent_binary() else {
        println!(
            "(no worker-agent next to this binary: build it with `cargo build --release --workspace` to have dev start \
             one; until then you are the worker)"
        );
        return Ok(None);
    };
    let broker = format!("http://127.0.0.1:{}", address.port());
    let child = Command::new(binary)
        .args(["--broker", &broker, "--queue", DEV_QUEUE, "--capacity", "4", "--exec", exec])
        .args(["--drain-grace", &humantime::format_duration(AGENT_DRAIN_GRACE).to_string()])
        // Its own process group: a Ctrl-C in the terminal reaches the broker only, which then drains the agent
        // with one SIGTERM (a second signal would make it release its jobs at once).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("starting the local worker agent")?;
    println!("worker agent: queue `{DEV_QUEUE}`, runs `{exec}` for every job");
    Ok(Some(child))
}

/// SIGTERM lets the agent drain: its running jobs get [`AGENT_DRAIN_GRACE`] to finish, then it releases the rest.
/// It is killed if it outlives that by a few seconds.
async fn stop_agent(mut agent: Child) {
    if let Some(pid) = agent.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    }
    if tokio::time::timeout(AGENT_DRAIN_GRACE + Duration::from_secs(5), agent.wait()).await.is_err() {
        let _ = agent.kill().await;
    }
}

/// Sends one job through broker and agent and prints what came back, with the grpcurl lines to do it by hand.
async fn demo(address: SocketAddr, exec: String) {
    let url = format!("http://127.0.0.1:{}", address.port());
    let outcome = async {
        let mut client = loop {
            match jobbroker::client::connect(url.clone()).await {
                Ok(client) => break client,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let spec = pb::JobSpec::new(DEV_QUEUE, "demo", b"hello from jobbroker".to_vec());
        let id = client.enqueue(pb::EnqueueRequest { jobs: vec![spec] }).await?.into_inner().jobs.remove(0).id;
        let mut changes = client.watch_job(pb::WatchJobRequest { id: id.clone() }).await?.into_inner();
        let mut last = None;
        while let Some(change) = changes.message().await? {
            last = change.job;
        }
        anyhow::Ok((id, last.context("the watch ended without a job")?))
    };
    match tokio::time::timeout(Duration::from_secs(30), outcome).await {
        Ok(Ok((id, job))) => println!(
            "demo job {id}: {:?}, result {:?} (payload \"hello from jobbroker\" through `{exec}`)\n\
             Send your own (grpcurl, or `buf curl --protocol grpc --http2-prior-knowledge`):\n  \
             grpcurl -plaintext -d '{{\"jobs\":[{{\"queue\":\"{DEV_QUEUE}\",\"kind\":\"hello\",\"payload\":\"aGk=\"}}]}}' \
             127.0.0.1:{port} jobbroker.v1.BrokerService/Enqueue\n  \
             grpcurl -plaintext -d '{{\"id\":\"<job id>\"}}' 127.0.0.1:{port} jobbroker.v1.BrokerService/GetJob",
            job.state(),
            String::from_utf8_lossy(&job.result),
            port = address.port(),
        ),
        Ok(Err(error)) => tracing::warn!(%error, "the demo job failed"),
        Err(_) => tracing::warn!("the demo job did not finish within 30 s; is the worker agent running?"),
    }
}
