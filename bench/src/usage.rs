//! What a process costs, read from Linux's `/proc`: resident memory, CPU seconds, and the CPU of a whole local
//! Postgres server (the postmaster and every backend it forked). Used for the broker child, the worker agent and
//! the database, so that "CPU per 10 000 jobs" can be split between them.
//!
//! Nothing here starts or stops processes; [`terminate`] only sends SIGTERM to a child we own.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{process::Child, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::report::Figure;

/// One process, by pid.
#[derive(Debug, Clone, Copy)]
pub struct Proc(pub u32);

impl Proc {
    /// `VmRSS` (now) or `VmHWM` (peak) in MiB.
    pub fn memory(self, field: &str) -> anyhow::Result<f64> {
        let pid = self.0;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
            .with_context(|| format!("{field} in /proc/{pid}/status"))?;
        Ok(kib / 1024.0)
    }

    /// User plus system CPU seconds of the process itself.
    pub fn cpu_seconds(self) -> anyhow::Result<f64> {
        let stat = Stat::read(self.0)?;
        Ok(stat.own)
    }
}

/// The fields of `/proc/PID/stat` we use, in seconds.
struct Stat {
    parent: u32,
    /// utime + stime.
    own: f64,
    /// cutime + cstime: children that exited and were waited for.
    reaped: f64,
}

impl Stat {
    fn read(pid: u32) -> anyhow::Result<Stat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // After the parenthesised command name (proc(5)): state is field 3, ppid 4, utime 14 … cstime 17.
        let fields: Vec<&str> = stat.rsplit_once(')').context("/proc/PID/stat")?.1.split_whitespace().collect();
        let field = |n: usize| -> anyhow::Result<f64> {
            Ok(fields.get(n - 3).context("short /proc/PID/stat")?.parse::<f64>()? / clock_ticks())
        };
        Ok(Stat {
            parent: fields.get(1).context("ppid")?.parse()?,
            own: field(14)? + field(15)?,
            reaped: field(16)? + field(17)?,
        })
    }
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of a Postgres server so far: the postmaster's own and its reaped children's, plus every live
/// backend's. Differences of two readings are the server's CPU in between.
pub fn postgres_cpu(postmaster: u32) -> anyhow::Result<f64> {
    let main = Stat::read(postmaster)?;
    let mut total = main.own + main.reaped;
    for backend in children_of(postmaster)? {
        // A backend may exit between listing and reading; it is then counted in `reaped` next time.
        total += Stat::read(backend.0).map_or(0.0, |stat| stat.own);
    }
    Ok(total)
}

/// The live child processes of `parent`.
pub fn children_of(parent: u32) -> anyhow::Result<Vec<Proc>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if Stat::read(pid).is_ok_and(|stat| stat.parent == parent) {
            children.push(Proc(pid));
        }
    }
    Ok(children)
}

/// The postmaster of the backend with this pid, if that backend runs on this machine.
pub fn parent_of(pid: u32) -> Option<u32> {
    Stat::read(pid).ok().map(|stat| stat.parent)
}

/// What the broker, Postgres and the bench itself used over a measured window.
pub struct Window {
    broker: Proc,
    postmaster: Option<u32>,
    started: Instant,
    cpu: [f64; 3],
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
    sampler: JoinHandle<()>,
}

/// CPU seconds used and the broker's peak resident memory during a [`Window`].
pub struct Used {
    pub wall: Duration,
    pub broker_cpu: f64,
    pub postgres_cpu: Option<f64>,
    pub bench_cpu: f64,
    pub broker_peak_mib: f64,
}

impl Window {
    /// Starts measuring; the broker's resident memory is sampled every 20 ms until [`Window::finish`].
    pub fn start(broker: Proc, postmaster: Option<u32>) -> anyhow::Result<Window> {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                while stop.run_until_cancelled(tick.tick()).await.is_some() {
                    if let Ok(mib) = broker.memory("VmRSS") {
                        peak.fetch_max((mib * 1024.0) as u64, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Window {
            broker,
            postmaster,
            started: Instant::now(),
            cpu: cpu_now(broker, postmaster)?,
            peak,
            stop,
            sampler,
        })
    }

    pub async fn finish(self) -> anyhow::Result<Used> {
        let cpu = cpu_now(self.broker, self.postmaster)?;
        let wall = self.started.elapsed();
        self.stop.cancel();
        self.sampler.await?;
        let peak = (self.peak.load(Ordering::Relaxed) as f64 / 1024.0).max(self.broker.memory("VmRSS")?);
        Ok(Used {
            wall,
            broker_cpu: cpu[0] - self.cpu[0],
            postgres_cpu: self.postmaster.map(|_| cpu[1] - self.cpu[1]),
            bench_cpu: cpu[2] - self.cpu[2],
            broker_peak_mib: peak,
        })
    }
}

impl Used {
    /// CPU per 10 000 of `jobs` of the broker, Postgres and the bench (whose part is `bench_role`), and wall time
    /// likewise, as figures keyed `{key}.broker_cpu` … and named `{scenario}: …`.
    pub fn per_10k(&self, key: &str, scenario: &str, bench_role: &str, jobs: usize) -> Vec<Figure> {
        let per_10k = |seconds: f64| seconds * 10_000.0 / jobs as f64;
        let mut figures = vec![Figure::new(
            format!("{key}.broker_cpu"),
            format!("{scenario}: broker CPU per 10 000 jobs"),
            per_10k(self.broker_cpu),
            "s",
        )];
        if let Some(cpu) = self.postgres_cpu {
            let name = format!("{scenario}: Postgres CPU per 10 000 jobs");
            figures.push(Figure::new(format!("{key}.postgres_cpu"), name, per_10k(cpu), "s"));
        }
        let name = format!("{scenario}: bench ({bench_role}) CPU per 10 000 jobs");
        figures.push(Figure::new(format!("{key}.bench_cpu"), name, per_10k(self.bench_cpu), "s"));
        let name = format!("{scenario}: wall time per 10 000 jobs (2 cores = 2× this in CPU)");
        figures.push(Figure::new(format!("{key}.wall"), name, per_10k(self.wall.as_secs_f64()), "s"));
        figures
    }
}

/// Broker, Postgres (0 when unknown) and this process, in CPU seconds.
fn cpu_now(broker: Proc, postmaster: Option<u32>) -> anyhow::Result<[f64; 3]> {
    let postgres = postmaster.map(postgres_cpu).transpose()?.unwrap_or(0.0);
    Ok([broker.cpu_seconds()?, postgres, Proc(std::process::id()).cpu_seconds()?])
}

/// SIGTERM to a child process and its exit status, within `patience`.
pub async fn terminate(child: &mut Child, patience: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let pid = child.id().context("the child has already exited")?;
    let sent = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
    tokio::time::timeout(patience, child.wait())
        .await
        .with_context(|| format!("pid {pid} did not exit"))?
        .map_err(Into::into)
}
