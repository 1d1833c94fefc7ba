//! `bench --agent PATH`: what the worker agent costs, measured on the real binary against the in-process broker:
//! its resident memory once connected and idle, and jobs/s through `--exec true` and through `--http` to a
//! minimal local HTTP server (both at `--agent-capacity`). A job's time runs from its enqueue to its completion
//! as the database recorded them, so the figure includes the broker's round trips, not just the agent's work.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use jobbroker::v1 as pb;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, ChildStderr, Command},
    task::{JoinHandle, JoinSet},
};

use super::{Figure, query};

pub async fn run(
    address: &str,
    database_url: &str,
    agent: &Path,
    jobs: usize,
    capacity: u32,
) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();

    let mut running = Agent::start(agent, address, "agent-exec", capacity, &["--exec", "true"]).await?;
    figures.push(Figure {
        name: "worker-agent RSS, connected and idle".into(),
        value: running.rss("VmRSS")?,
        unit: "MiB",
    });
    let cpu = running.cpu_seconds()?;
    figures.push(
        throughput(address, database_url, "agent-exec", jobs, &format!("exec `true`, capacity {capacity}")).await?,
    );
    figures.push(running.cpu_per_job("exec", cpu, jobs)?);
    figures.push(Figure {
        name: "worker-agent peak RSS after the exec run".into(),
        value: running.rss("VmHWM")?,
        unit: "MiB",
    });
    running.stop().await?;

    let (server, http) = http_server().await?;
    let url = format!("http://{server}/jobs");
    let mut running = Agent::start(agent, address, "agent-http", capacity, &["--http", &url]).await?;
    let cpu = running.cpu_seconds()?;
    let result =
        throughput(address, database_url, "agent-http", jobs, &format!("http POST, capacity {capacity}")).await;
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

    /// `VmRSS` (now) or `VmHWM` (peak) from /proc, in MiB.
    fn rss(&self, field: &str) -> anyhow::Result<f64> {
        let pid = self.child.id().context("the agent's pid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
            .with_context(|| format!("{field} in /proc/{pid}/status"))?;
        Ok(kib / 1024.0)
    }

    /// User and system CPU time of the agent process itself (not of the commands it ran), in seconds.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("the agent's pid")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name: state is field 3, utime 14 and stime 15 (proc(5)).
        let fields: Vec<&str> = stat.rsplit_once(')').context("/proc/pid/stat")?.1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        let per_second = std::process::Command::new("getconf").arg("CLK_TCK").output()?;
        Ok(ticks / String::from_utf8(per_second.stdout)?.trim().parse::<f64>()?)
    }

    fn cpu_per_job(&self, what: &str, before: f64, jobs: usize) -> anyhow::Result<Figure> {
        let used = self.cpu_seconds()? - before;
        Ok(Figure {
            name: format!("worker-agent CPU per {what} job (itself)"),
            value: used * 1e6 / jobs as f64,
            unit: "µs",
        })
    }

    /// SIGTERM, and the agent must exit 0 (it drains: nothing is running by now).
    async fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the agent's pid")?;
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.context("drain")??;
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
async fn throughput(address: &str, database_url: &str, queue: &str, jobs: usize, what: &str) -> anyhow::Result<Figure> {
    let mut client = super::connect(address).await?;
    for first in (0..jobs).step_by(1000) {
        let batch = (first..(first + 1000).min(jobs)).map(|i| pb::JobSpec::new(queue, "noop", i.to_string())).collect();
        client.enqueue(pb::EnqueueRequest { jobs: batch }).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let counted = format!("SELECT count(*) FROM finished_jobs WHERE queue = '{queue}'");
    while query(database_url, &counted)?.parse::<usize>()? < jobs {
        anyhow::ensure!(Instant::now() < deadline, "{queue}: the jobs did not finish within 10 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = query(
        database_url,
        &format!(
            "SELECT count(*) FILTER (WHERE state = 'succeeded'), \
             extract(epoch FROM max(finished_at) - min(created_at)) FROM finished_jobs WHERE queue = '{queue}'"
        ),
    )?;
    let (succeeded, seconds) = summary.split_once('|').context("count|seconds")?;
    anyhow::ensure!(succeeded.parse::<usize>()? == jobs, "{queue}: only {succeeded} of {jobs} jobs succeeded");
    Ok(super::rate(
        format!("worker-agent: {jobs} jobs through {what}"),
        jobs,
        Duration::from_secs_f64(seconds.parse()?),
    ))
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
