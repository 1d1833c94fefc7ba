//! `bench --agent PATH`: what the worker agent costs, measured on the real binary against a broker child:
//! its resident memory once connected and idle, and jobs/s through `--exec true` and through `--http` to a
//! minimal local HTTP server (both at `--agent-capacity`). A job's time runs from its enqueue to its completion
//! as the database recorded them, so the figure includes the broker's round trips, not just the agent's work.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, ChildStderr, Command},
    task::{JoinHandle, JoinSet},
};

use crate::{
    drain, enqueue,
    env::Env,
    report::Figure,
    usage::{self, Proc},
};

pub async fn run(env: &Env, agent: &Path, jobs: usize, capacity: u32) -> anyhow::Result<Vec<Figure>> {
    let address = env.address.as_str();
    let mut figures = Vec::new();

    let mut running = Agent::start(agent, address, "agent-exec", capacity, &["--exec", "true"]).await?;
    figures.push(Figure::new("agent.rss", "worker-agent RSS, connected and idle", running.rss("VmRSS")?, "MiB"));
    let guard = running.guard()?.memory("VmRSS")?;
    figures.push(Figure::new("agent.guard_rss", "worker-agent's process group guard RSS", guard, "MiB"));
    let cpu = running.cpu_seconds()?;
    figures.push(throughput(env, "agent-exec", jobs, &format!("exec `true`, capacity {capacity}")).await?);
    figures.push(running.cpu_per_job("exec", cpu, jobs)?);
    let peak = running.rss("VmHWM")?;
    figures.push(Figure::new("agent.rss_peak", "worker-agent peak RSS after the exec run", peak, "MiB"));
    running.stop().await?;

    let (server, http) = http_server().await?;
    let url = format!("http://{server}/jobs");
    let mut running = Agent::start(agent, address, "agent-http", capacity, &["--http", &url]).await?;
    let cpu = running.cpu_seconds()?;
    let result = throughput(env, "agent-http", jobs, &format!("http POST, capacity {capacity}")).await;
    let cpu = running.cpu_per_job("http", cpu, jobs);
    running.stop().await?;
    http.abort();
    figures.push(result?);
    figures.push(cpu?);
    Ok(figures)
}

/// A worker-agent child process.
struct Agent {
    child: Child,
    /// Reads (and drops) its logs, so it never blocks on a full stderr pipe.
    logs: JoinHandle<()>,
}

impl Agent {
    /// Starts the agent and waits until it has connected to the broker.
    async fn start(path: &Path, broker: &str, queue: &str, capacity: u32, handler: &[&str]) -> anyhow::Result<Agent> {
        let mut child = Command::new(path)
            .args(["--broker", broker, "--queue", queue, "--capacity", &capacity.to_string()])
            .args(handler)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let mut lines = BufReader::new(child.stderr.take().context("the agent's stderr")?).lines();
        let connected = async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("connected") {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("the agent exited before connecting")
        };
        tokio::time::timeout(Duration::from_secs(10), connected).await.context("the agent did not connect")??;
        // Let start-up allocations settle before anyone reads the idle RSS.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let logs = tokio::spawn(drop_lines(lines));
        Ok(Agent { child, logs })
    }

    fn proc(&self) -> anyhow::Result<Proc> {
        self.child.id().map(Proc).context("the agent has exited")
    }

    /// The process group guard an agent with an `exec` handler starts: its only child while no job runs.
    fn guard(&self) -> anyhow::Result<Proc> {
        let children = usage::children_of(self.proc()?.0)?;
        match children[..] {
            [guard] => Ok(guard),
            _ => anyhow::bail!("an idle exec agent has {} child processes, not just its guard", children.len()),
        }
    }

    fn rss(&self, field: &str) -> anyhow::Result<f64> {
        self.proc()?.memory(field)
    }

    /// User and system CPU time of the agent process itself (not of the commands it ran), in seconds.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.proc()?.cpu_seconds()
    }

    fn cpu_per_job(&self, what: &str, before: f64, jobs: usize) -> anyhow::Result<Figure> {
        let used = self.cpu_seconds()? - before;
        let name = format!("worker-agent CPU per {what} job (itself)");
        Ok(Figure::new(format!("agent.{what}_cpu"), name, used * 1e6 / jobs as f64, "µs"))
    }

    /// SIGTERM, and the agent must exit 0 (it drains: nothing is running by now).
    async fn stop(&mut self) -> anyhow::Result<()> {
        let status = usage::terminate(&mut self.child, Duration::from_secs(10)).await?;
        self.logs.abort();
        anyhow::ensure!(status.success(), "the agent exited with {status} after SIGTERM");
        Ok(())
    }
}

async fn drop_lines(mut lines: tokio::io::Lines<BufReader<ChildStderr>>) {
    while let Ok(Some(_)) = lines.next_line().await {}
}

/// Enqueues `jobs` jobs on `queue` (batches of 1000) and waits until all succeeded; the rate is taken from the
/// first enqueue to the last completion as the database recorded them.
async fn throughput(env: &Env, queue: &str, jobs: usize, what: &str) -> anyhow::Result<Figure> {
    enqueue::batches(env, queue, jobs, 1000).await?;
    drain::wait_finished(&env.pool, queue, jobs, drain::PATIENCE).await?;
    let (succeeded, seconds): (i64, f64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), \
           extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM finished_jobs WHERE queue = $1",
    )
    .bind(queue)
    .fetch_one(&env.pool)
    .await?;
    anyhow::ensure!(succeeded as usize == jobs, "{queue}: only {succeeded} of {jobs} jobs succeeded");
    let name = format!("worker-agent: {jobs} jobs through {what}");
    Ok(Figure::rate(&format!("agent.{queue}"), name, jobs, Duration::from_secs_f64(seconds)))
}

/// The least HTTP/1.1 server that answers every request `200 ok` on a kept-alive connection: the endpoint of the
/// `--http` run costs next to nothing, so the figure is the agent's (and the broker's).
async fn http_server() -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.spawn(answer_ok(stream));
        }
    });
    Ok((address, server))
}

async fn answer_ok(stream: TcpStream) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    loop {
        let mut length = 0;
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        stream.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await?;
    }
}
