//! The group guard: a small process that kills the process groups of an agent's running commands when the agent
//! dies without doing it itself (SIGKILL, the OOM killer, a crash).
//!
//! The agent starts it once, from its own binary (`worker-agent --guard-process-groups`), with a pipe on its
//! stdin, and writes a line to that pipe for every command group it starts (`+<group>`) and ends (`-<group>`).
//! The kernel closes the pipe when the agent exits, however it exits: the guard then SIGKILLs every group still on
//! its list and exits. It ignores the terminal's and the service manager's stop signals (they reach the agent's
//! whole process group) so that it lasts as long as the agent, and it holds none of the agent's environment.

use std::{
    collections::HashSet,
    io::{BufRead as _, Write as _},
    os::unix::process::CommandExt as _,
    process::{ChildStdin, Command, ExitCode, Stdio},
    sync::Mutex,
};

/// The argument that turns the `worker-agent` binary into the guard.
pub const GUARD_ARG: &str = "--guard-process-groups";

/// The agent's end of the guard: where it reports the groups it starts and ends.
pub struct Guard {
    /// `None` once a write failed (the guard is gone): the agent goes on without it.
    pipe: Mutex<Option<ChildStdin>>,
}

impl Guard {
    /// Starts the guard process (this binary, by `/proc/self/exe`, so an agent replaced on disk still finds it).
    /// If it cannot start, the agent runs without it and says so.
    pub fn start() -> Guard {
        let started = Command::new("/proc/self/exe")
            .arg0("worker-agent")
            .arg(GUARD_ARG)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn();
        let pipe = match started {
            Ok(mut child) => {
                tracing::debug!(pid = child.id(), "process group guard started");
                child.stdin.take()
            }
            Err(error) => {
                tracing::warn!(%error, "cannot start the process group guard: commands of a killed agent will run on");
                None
            }
        };
        Guard { pipe: Mutex::new(pipe) }
    }

    /// Puts `group` (a command's process group) in the guard's care until the returned [`Watched`] is dropped.
    pub fn watch(&self, group: i32) -> Watched<'_> {
        self.send('+', group);
        Watched { guard: self, group }
    }

    fn send(&self, op: char, group: i32) {
        let mut pipe = self.pipe.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(writer) = pipe.as_mut()
            && let Err(error) = writeln!(writer, "{op}{group}")
        {
            tracing::warn!(%error, "the process group guard is gone: commands of a killed agent will run on");
            *pipe = None;
        }
    }
}

/// A command's process group while its job runs: killed by the guard if the agent dies, and killed (all of it)
/// when this is dropped, whatever way the job ended.
pub struct Watched<'a> {
    guard: &'a Guard,
    group: i32,
}

impl Watched<'_> {
    /// SIGKILLs the whole group: the command and every process it started that stayed in it.
    pub fn kill(&self) {
        kill_group(self.group);
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.kill();
        self.guard.send('-', self.group);
    }
}

fn kill_group(group: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. A negative pid names a process group;
    // ESRCH (nobody left) is fine.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// The guard process: keeps the list of live groups from its stdin until the agent's end closes it, then kills
/// them all.
pub fn serve() -> ExitCode {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: signal(2) with SIG_IGN installs no handler of ours; it only sets this process's disposition.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
    let mut groups = HashSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match (line.get(..1), line.get(1..).and_then(|group| group.parse::<i32>().ok())) {
            (Some("+"), Some(group)) if group > 0 => groups.insert(group),
            (Some("-"), Some(group)) => groups.remove(&group),
            _ => continue,
        };
    }
    groups.into_iter().for_each(kill_group);
    ExitCode::SUCCESS
}
