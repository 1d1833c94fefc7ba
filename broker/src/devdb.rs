//! A private PostgreSQL server in a local directory, for `broker dev` and for the tests.
//!
//! [`LocalPostgres::start`] finds the server binaries, runs `initdb` once, then starts a postmaster (or reuses the
//! one already running from that directory) that listens on 127.0.0.1 only, trusts every local TCP client and has
//! no unix sockets. Processes racing for one directory are serialised by a lock file; the later ones reuse the
//! server the first one started. PostgreSQL refuses to run as root, so when we are root the server binaries run
//! as the `postgres` system user, and the data directory must be reachable by that user (see [`scratch_dir`]).
//!
//! Deliberately not here: connecting (no sqlx; callers get a URL), creating databases, migrations, and anything a
//! production server needs (passwords, TLS, tuning). Unix only. Every call blocks; use `spawn_blocking` from async.

use std::{
    fs::{self, File, OpenOptions, Permissions},
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Names the directory holding `initdb`, `pg_ctl` and `postgres` when they are not found by themselves.
pub const PG_BIN_ENV: &str = "JOBBROKER_PG_BIN";
/// How long a start or stop may take before we give up.
const TIMEOUT: Duration = Duration::from_secs(60);
const SERVER_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// Client authentication: anyone on the loopback interface, as any role, without a password. Nothing else.
const PG_HBA: &str = "# Written by jobbroker devdb: trust loopback TCP clients, nothing else.\n\
                      host all all 127.0.0.1/32 trust\n";

/// How the server is configured; applied on every start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// `false` turns off fsync and full_page_writes: fast for tests. Commits are still written to the OS before
    /// they are acknowledged (synchronous_commit stays on), so they survive a crash of Postgres (`stop_immediate`,
    /// a killed postmaster), though not a crash of the machine.
    pub durable: bool,
    /// Many test brokers share one server, each with its own connection pool.
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { durable: true, max_connections: 400 }
    }
}

impl PgOptions {
    /// Settings for a throwaway test server: not durable, otherwise the defaults.
    pub fn fast() -> Self {
        PgOptions { durable: false, ..PgOptions::default() }
    }
}

/// A running PostgreSQL server on 127.0.0.1 with its data in a local directory.
///
/// Dropping it leaves the server running (so later processes reuse it), except for [`LocalPostgres::temporary`].
#[derive(Debug)]
pub struct LocalPostgres {
    /// Ours alone: `pgdata/` (the cluster), `postgres.log`, `lock`, and `initialized` once initdb has succeeded.
    dir: PathBuf,
    /// The directory holding initdb, pg_ctl and postgres.
    bin: PathBuf,
    port: u16,
    /// `Some((uid, gid))` of the `postgres` user when we are root.
    run_as: Option<(u32, u32)>,
    options: PgOptions,
    /// Stop the server and delete `dir` on drop.
    throwaway: bool,
}

impl LocalPostgres {
    /// Finds the server binaries (`$JOBBROKER_PG_BIN`, then `PATH`, then the highest `/usr/lib/postgresql/*/bin`),
    /// initialises `data_dir` on first use, starts the server on `port` unless it already runs from `data_dir`, and
    /// returns once it accepts connections. Fails if a server runs from `data_dir` on another port.
    pub fn start(data_dir: &Path, port: u16, options: &PgOptions) -> Result<LocalPostgres> {
        let pg = LocalPostgres::open(data_dir, port, options)?;
        pg.start_now()?;
        Ok(pg)
    }

    /// A fresh server in a new [`scratch_dir`] on a free port, stopped and deleted when dropped.
    pub fn temporary(name: &str, options: &PgOptions) -> Result<LocalPostgres> {
        let dir = scratch_dir(&format!("{name}-{}", uuid::Uuid::new_v4().simple()));
        let mut pg = LocalPostgres::open(&dir, free_port()?, options)?;
        pg.throwaway = true;
        let mut attempts = 0;
        loop {
            match pg.start_now() {
                Ok(()) => return Ok(pg),
                // Most likely another process took the free port before the server bound it.
                Err(error) if attempts < 2 => tracing::debug!(%error, "retrying on another port"),
                Err(error) => return Err(error),
            }
            attempts += 1;
            pg.port = free_port()?;
        }
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of `database` on this server, as the superuser `postgres`.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory given to [`LocalPostgres::start`] (absolute); the cluster is in its `pgdata/`.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (`pg_ctl stop -m fast`) and waits until it is gone. Stopping a stopped server is fine.
    pub fn stop(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.stop_locked("fast")
    }

    /// Stops the server without a shutdown checkpoint (`pg_ctl stop -m immediate`): the next start recovers from
    /// the WAL, as after a crash of Postgres.
    pub fn stop_immediate(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.stop_locked("immediate")
    }

    /// Stops the server if it runs, then starts it again on the same port from the same directory.
    pub fn restart(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.stop_locked("fast")?;
        self.start_locked()
    }

    fn open(data_dir: &Path, port: u16, options: &PgOptions) -> Result<LocalPostgres> {
        let bin = find_server_binaries()?;
        let run_as = postgres_user_if_root()?;
        let dir = std::path::absolute(data_dir).with_context(|| format!("resolving {}", data_dir.display()))?;
        create_reachable_dirs(&dir)?;
        let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
        Ok(LocalPostgres { dir, bin, port, run_as, options: options.clone(), throwaway: false })
    }

    fn start_now(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.hand_dir_to_server_user()?;
        self.init_once()?;
        self.start_locked()
    }

    fn pgdata(&self) -> PathBuf {
        self.dir.join("pgdata")
    }

    /// Serialises start, stop and restart across threads and processes (an OS lock, released on exit).
    fn lock(&self) -> Result<File> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path);
        let file = file.with_context(|| format!("opening {}", path.display()))?;
        file.lock().with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    }

    /// When we are root the server runs as `postgres`, which must own our directory and reach it.
    fn hand_dir_to_server_user(&self) -> Result<()> {
        let Some((uid, gid)) = self.run_as else { return Ok(()) };
        std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid))
            .with_context(|| format!("handing {} to the postgres user", self.dir.display()))?;
        let mut probe = self.command("test");
        probe.current_dir("/").arg("-w").arg(&self.dir).arg("-a").arg("-x").arg(&self.dir);
        if !probe.status().is_ok_and(|status| status.success()) {
            bail!(
                "the postgres user cannot reach {}: as root the server runs as `postgres` (PostgreSQL refuses \
                 root), so every parent directory must be traversable by it; use a directory under /var/tmp",
                self.dir.display()
            );
        }
        Ok(())
    }

    fn init_once(&self) -> Result<()> {
        let done = self.dir.join("initialized");
        if done.exists() {
            return Ok(());
        }
        let pgdata = self.pgdata();
        if pgdata.exists() {
            // Left by an initdb that did not finish; we hold the lock, so nobody is using it.
            fs::remove_dir_all(&pgdata).with_context(|| format!("removing unfinished {}", pgdata.display()))?;
        }
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(&pgdata).args(["--username=postgres", "--auth=trust", "--encoding=UTF8", "--no-locale"]);
        if !self.options.durable {
            initdb.arg("--no-sync");
        }
        run(initdb, "initdb")?;
        fs::write(pgdata.join("pg_hba.conf"), PG_HBA).context("writing pg_hba.conf")?;
        let mut conf = OpenOptions::new().append(true).open(pgdata.join("postgresql.conf"))?;
        writeln!(conf, "\n# Settings of jobbroker devdb, rewritten on every start.\ninclude_if_exists = 'devdb.conf'")
            .context("extending postgresql.conf")?;
        fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
        tracing::info!(dir = %self.dir.display(), "initialised a private Postgres cluster");
        Ok(())
    }

    fn start_locked(&self) -> Result<()> {
        match self.running_port()? {
            Some(port) if port == self.port => {
                tracing::debug!(port, dir = %self.dir.display(), "reusing the running private Postgres");
            }
            Some(port) => bail!(
                "a Postgres from {} already runs on port {port}, not {}; stop it with `pg_ctl stop -D {}`",
                self.dir.display(),
                self.port,
                self.pgdata().display()
            ),
            None => {
                fs::write(self.pgdata().join("devdb.conf"), self.settings()).context("writing devdb.conf")?;
                let log = self.dir.join("postgres.log");
                let mut pg_ctl = self.command("pg_ctl");
                pg_ctl.args(["start", "--wait", "--silent", "--timeout", "60", "--pgdata"]);
                pg_ctl.arg(self.pgdata()).arg("--log").arg(&log);
                if let Err(error) = run(pg_ctl, "pg_ctl start") {
                    bail!("{error:#}\nend of {}:\n{}", log.display(), tail(&log));
                }
                tracing::info!(port = self.port, dir = %self.dir.display(), "started a private Postgres");
            }
        }
        wait_until_ready(self.port)
    }

    fn stop_locked(&self, mode: &str) -> Result<()> {
        if self.running_port()?.is_none() {
            return Ok(());
        }
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.args(["stop", "--wait", "--silent", "--timeout", "60", "--mode", mode, "--pgdata"]).arg(self.pgdata());
        run(pg_ctl, "pg_ctl stop")?;
        tracing::info!(port = self.port, mode, dir = %self.dir.display(), "stopped a private Postgres");
        Ok(())
    }

    /// The port of the server running from our directory, if one runs.
    fn running_port(&self) -> Result<Option<u16>> {
        let mut pg_ctl = self.command("pg_ctl");
        let status =
            pg_ctl.arg("status").arg("--pgdata").arg(self.pgdata()).output().context("running pg_ctl status")?;
        match status.status.code() {
            Some(0) => self.pid_file_line(4)?.parse().map(Some).context("reading the port from postmaster.pid"),
            Some(3) => Ok(None),
            _ => bail!("pg_ctl status failed ({}): {}", status.status, String::from_utf8_lossy(&status.stderr).trim()),
        }
    }

    /// Line `n` (from 1) of `postmaster.pid`: 1 is the postmaster's pid, 4 its port.
    fn pid_file_line(&self, n: usize) -> Result<String> {
        let path = self.pgdata().join("postmaster.pid");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let line = text.lines().nth(n - 1).ok_or_else(|| anyhow!("{} has no line {n}", path.display()))?;
        Ok(line.trim().to_owned())
    }

    fn settings(&self) -> String {
        let durable = if self.options.durable { "on" } else { "off" };
        format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\nmax_connections = {}\n\
             shared_buffers = '64MB'\nfsync = {durable}\nfull_page_writes = {durable}\n",
            self.port, self.options.max_connections
        )
    }

    /// `program` run in our directory, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let program = if SERVER_BINARIES.contains(&program) { self.bin.join(program) } else { PathBuf::from(program) };
        let mut command = Command::new(program);
        command.current_dir(&self.dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if !self.throwaway {
            return;
        }
        if let Err(error) = self.stop_immediate() {
            tracing::warn!(error = format!("{error:#}"), "could not stop a temporary Postgres");
        }
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(%error, dir = %self.dir.display(), "could not delete a temporary Postgres");
        }
    }
}

/// Where throwaway clusters go: `/var/tmp/jobbroker/<name>` when we are root (the `postgres` user must traverse
/// every parent, and `/root` or a private `TMPDIR` would stop it), else `<temp dir>/jobbroker-<uid>/<name>`.
pub fn scratch_dir(name: &str) -> PathBuf {
    match effective_uid() {
        Some(0) => PathBuf::from("/var/tmp/jobbroker").join(name),
        Some(uid) => std::env::temp_dir().join(format!("jobbroker-{uid}")).join(name),
        None => std::env::temp_dir().join("jobbroker").join(name),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("looking for a free TCP port")?;
    Ok(listener.local_addr()?.port())
}

fn find_server_binaries() -> Result<PathBuf> {
    let complete = |dir: &Path| SERVER_BINARIES.iter().all(|name| dir.join(name).is_file());
    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            bail!("{PG_BIN_ENV}={} lacks initdb, pg_ctl or postgres", dir.display())
        };
    }
    // Follow symlinks: /usr/local/bin/pg_ctl may point into /usr/lib/postgresql/15/bin, next to the rest.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path)
        .filter_map(|dir| Some(dir.join("pg_ctl").canonicalize().ok()?.parent()?.to_path_buf()))
        .find(|dir| complete(dir));
    if let Some(dir) = on_path {
        return Ok(dir);
    }
    let installed = fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten();
    let versioned =
        installed.filter_map(|entry| Some((entry.file_name().to_str()?.parse::<u32>().ok()?, entry.path())));
    let newest = versioned.map(|(version, dir)| (version, dir.join("bin"))).filter(|(_, dir)| complete(dir)).max();
    newest.map(|(_, dir)| dir).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) are not on PATH nor in /usr/lib/postgresql/*/bin: \
             install them (`apt-get install postgresql` on Debian/Ubuntu, `dnf install postgresql-server` on \
             Fedora, `brew install postgresql` on macOS) or set {PG_BIN_ENV} to their directory"
        )
    })
}

/// `Some((uid, gid))` of the `postgres` user when we run as root, `None` otherwise.
fn postgres_user_if_root() -> Result<Option<(u32, u32)>> {
    if effective_uid() != Some(0) {
        return Ok(None);
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => bail!(
            "we run as root, which PostgreSQL refuses, and there is no `postgres` user to run it as: create one \
             (`useradd --system --user-group postgres`) or run as an ordinary user"
        ),
    }
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok();
    let from_proc = status.as_deref().and_then(|s| s.lines().find_map(|line| line.strip_prefix("Uid:")));
    if let Some(euid) = from_proc.and_then(|ids| ids.split_whitespace().nth(1)) {
        return euid.parse().ok();
    }
    let out = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Creates `dir` and its missing parents, world-traversable whatever the umask (the server may run as another user).
fn create_reachable_dirs(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => fs::set_permissions(d, Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
    Ok(())
}

fn run(mut command: Command, what: &str) -> Result<Output> {
    let out =
        command.output().with_context(|| format!("running {what} ({})", Path::new(command.get_program()).display()))?;
    if !out.status.success() {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        bail!("{what} failed ({}): {} {}", out.status, stderr.trim(), stdout.trim());
    }
    Ok(out)
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn wait_until_ready(port: u16) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match ping(port) {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                return Err(error).context(format!("Postgres on 127.0.0.1:{port} refuses connections"));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Opens a session as `postgres` and ends it: Ok once the server accepts connections (not merely TCP: a server
/// still starting or recovering answers with an error, which is returned).
fn ping(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // StartupMessage, protocol 3.0.
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for text in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(text.as_bytes());
        body.push(0);
    }
    let length = u32::try_from(body.len() + 4)?;
    stream.write_all(&[&length.to_be_bytes()[..], &body].concat())?;
    let mut header = [0u8; 5];
    stream.read_exact(&mut header)?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut message = vec![0u8; length.saturating_sub(4).min(1 << 16)];
    stream.read_exact(&mut message)?;
    match header[0] {
        // Authentication: the server accepts sessions. End ours politely with Terminate.
        b'R' => {
            let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
            Ok(())
        }
        // ErrorResponse: fields of a type byte and a C string; `M` is the message.
        b'E' => {
            let fields = message.split(|byte| *byte == 0).filter(|field| !field.is_empty());
            let text = fields.filter_map(|field| field.strip_prefix(b"M")).next().unwrap_or_default();
            bail!("Postgres answered: {}", String::from_utf8_lossy(text))
        }
        other => bail!("not a Postgres server on port {port} (answered {other:#x})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_server_accepts_connections_restarts_and_stops() {
        let pg = LocalPostgres::temporary("devdb-unit", &PgOptions::fast()).expect("starts");
        assert_eq!(pg.url(), format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port()));
        ping(pg.port()).expect("accepts sessions once started");
        let first_pid = pg.pid_file_line(1).expect("pid");

        pg.restart().expect("restarts");
        ping(pg.port()).expect("accepts sessions after a restart");
        assert_ne!(pg.pid_file_line(1).expect("pid"), first_pid, "a restart runs a new postmaster");

        pg.stop().expect("stops");
        assert!(ping(pg.port()).is_err(), "a stopped server refuses connections");
        pg.stop().expect("stopping a stopped server is fine");

        let dir = pg.data_dir().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "a temporary server's directory is deleted on drop");
    }

    #[test]
    fn racing_starts_initialise_once_and_share_one_server() {
        let dir = scratch_dir(&format!("devdb-race-{}", uuid::Uuid::new_v4().simple()));
        let port = free_port().expect("a free port");
        let starts: Vec<_> = (0..3)
            .map(|_| {
                let dir = dir.clone();
                thread::spawn(move || LocalPostgres::start(&dir, port, &PgOptions::fast()))
            })
            .collect();
        let mut servers: Vec<LocalPostgres> =
            starts.into_iter().map(|start| start.join().expect("no panic").expect("starts")).collect();
        servers[0].throwaway = true; // so that the server is stopped and the directory deleted at the end
        let pids: Vec<String> = servers.iter().map(|pg| pg.pid_file_line(1).expect("pid")).collect();
        assert!(pids.iter().all(|pid| *pid == pids[0]), "one postmaster for one directory: {pids:?}");
        ping(port).expect("accepts sessions");

        let other_port = LocalPostgres::start(&dir, free_port().expect("a free port"), &PgOptions::fast());
        let error = format!("{:#}", other_port.expect_err("the directory's server runs on another port"));
        assert!(error.contains("already runs on port"), "{error}");
    }
}
