//! The `exec` handler: runs a command per job in its own process group, the payload on stdin, the job's ids,
//! metadata and trace context in the environment; the exit code decides the outcome, stdout is the result.
//!
//! The agent's bearer token (`JOBBROKER_TOKEN`) is taken out of that environment: a job's command does not
//! inherit the worker's credential.
//!
//! Progress protocol: a line `##jobbroker:progress <percent> <message>` on stderr is forwarded on the next
//! heartbeat (and kept out of the error text). When the job must stop, the whole process group is SIGKILLed at
//! once; when the command exits, whatever it left running in its group is killed too. While it runs, the group is
//! in the care of the agent's [`Guard`], which kills it if the agent dies first.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use jobbroker::{
    client::TOKEN_VARIABLE,
    worker::{ActiveJob, Outcome},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    process::{ChildStderr, Command},
    time::Instant,
};

use super::{guard::Guard, stopped, text};
use crate::config::{ExecSpec, ExecUser, Program};

/// How much of stderr is kept for the error message.
const STDERR_TAIL: usize = 4096;
/// A stderr line longer than this is not a progress line; it goes to the error text in pieces.
const MAX_LINE: usize = 4096;
/// After the command exits, how long its output pipes may stay open (held by a process that escaped its group)
/// before the agent stops reading them.
const PIPE_LINGER: Duration = Duration::from_secs(1);
const PROGRESS_PREFIX: &str = "##jobbroker:progress";

pub struct Exec {
    spec: ExecSpec,
    shared: Arc<Shared>,
}

/// What every `exec` handler of an agent shares.
pub struct Shared {
    /// Bytes of stdout kept as the result.
    pub max_output: usize,
    pub guard: Guard,
    /// Whom commands run as (`--exec-user`); `None`: the agent's user.
    pub user: Option<ExecUser>,
}

impl Exec {
    pub fn new(spec: ExecSpec, shared: Arc<Shared>) -> Exec {
        Exec { spec, shared }
    }

    fn command(&self, job: &ActiveJob) -> Command {
        let mut command = match &self.spec.program {
            Program::Argv(argv) => {
                let mut command = Command::new(&argv[0]);
                command.args(&argv[1..]);
                command
            }
            Program::Shell(script) => {
                let mut command = Command::new("sh");
                command.arg("-c").arg(script);
                command
            }
        };
        command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("JOB_ID", job.id())
            .env("JOB_KIND", job.kind())
            .env("JOB_QUEUE", job.queue())
            .env("JOB_ATTEMPT", job.attempt().to_string())
            .env("JOB_LEASE_ID", job.lease_id())
            // The agent's own bearer token (a handler's configured `env` may still set one on purpose).
            .env_remove(TOKEN_VARIABLE);
        for (key, value) in job.metadata() {
            command.env(format!("JOB_META_{}", env_name(key)), value);
        }
        // The job's W3C trace context under the names OpenTelemetry's environment carrier uses; never the agent's own.
        for (name, value) in [("TRACEPARENT", job.traceparent()), ("TRACESTATE", job.tracestate())] {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        if let Some(user) = &self.shared.user {
            // std drops the supplementary groups too when it switches from root to `uid`.
            command.uid(user.uid).gid(user.gid);
            command.env("HOME", &user.home).env("USER", &user.name).env("LOGNAME", &user.name);
        }
        command.envs(&self.spec.env);
        command
    }

    pub async fn run(&self, job: &ActiveJob) -> Outcome {
        let mut child = match self.command(job).spawn() {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the command");
                return Outcome::retry(format!("cannot start {}: {e}", self.describe()));
            }
        };
        // The command leads its own group (`process_group(0)`): the group's id is its pid.
        let Some(group) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return Outcome::retry(format!("lost track of {}", self.describe()));
        };
        tracing::debug!(pid = group, "command started");
        let group = self.shared.guard.watch(group);
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let mut output = Vec::new();
        let mut truncated = false;
        let mut tail = Tail::new(STDERR_TAIL);
        let status = {
            let feed = async {
                if let Some(mut stdin) = stdin {
                    // A command that does not read its input closes the pipe: that is not an error.
                    let _ = stdin.write_all(job.payload()).await;
                } // dropping stdin closes it: the command sees end of input
            };
            let collect = async {
                if let Some(stdout) = stdout {
                    truncated = read_bounded(stdout, self.shared.max_output, &mut output).await;
                }
            };
            let watch = async {
                if let Some(stderr) = stderr {
                    watch_stderr(stderr, job, &mut tail).await;
                }
            };
            let io = async {
                tokio::join!(feed, collect, watch);
            };
            tokio::pin!(io);
            let (mut status, mut io_done, mut linger) = (None, false, None);
            while status.is_none() || !io_done {
                tokio::select! {
                    biased;
                    () = job.stopped() => {
                        group.kill();
                        let _ = child.wait().await;
                        tracing::info!(reason = ?job.stop_reason(), "command killed");
                        return stopped(job);
                    }
                    exit = child.wait(), if status.is_none() => {
                        status = Some(exit);
                        group.kill();
                        linger = Some(Instant::now() + PIPE_LINGER);
                    }
                    () = &mut io, if !io_done => io_done = true,
                    () = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {
                        tracing::warn!("the command exited but its output stays open; the rest is ignored");
                        break;
                    }
                }
            }
            status
        };
        let status = match status {
            Some(Ok(status)) => status,
            Some(Err(e)) => return Outcome::retry(format!("waiting for {}: {e}", self.describe())),
            None => return Outcome::retry(format!("lost track of {}", self.describe())),
        };
        if truncated {
            tracing::warn!(max_output_bytes = self.shared.max_output, "stdout truncated");
        }
        let outcome = exit_outcome(exit_of(status), output, &tail.text(), &self.spec.non_retryable_exit_codes);
        match &outcome {
            Outcome::Success(_) => tracing::debug!("command succeeded"),
            Outcome::Failure { non_retryable, .. } => {
                tracing::info!(status = %status, non_retryable, "command failed");
            }
            Outcome::Release => {}
        }
        outcome
    }

    /// The program, for error messages (not its arguments: they may hold secrets).
    fn describe(&self) -> String {
        match &self.spec.program {
            Program::Argv(argv) => format!("`{}`", argv[0]),
            Program::Shell(_) => "`sh -c …`".into(),
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

/// Exit 0: success with stdout. An exit code in `non_retryable`: non-retryable failure. Anything else
/// (another code, a signal): retryable failure. The message is the stderr tail, or says how it ended.
pub fn exit_outcome(exit: Exit, stdout: Vec<u8>, stderr_tail: &str, non_retryable: &[i32]) -> Outcome {
    let message = if stderr_tail.is_empty() {
        match exit {
            Exit::Code(code) => format!("exited with code {code}"),
            Exit::Signal(signal) => format!("killed by signal {signal}"),
        }
    } else {
        stderr_tail.to_owned()
    };
    match exit {
        Exit::Code(0) => Outcome::Success(stdout),
        Exit::Code(code) if non_retryable.contains(&code) => super::non_retryable(message),
        _ => Outcome::retry(message),
    }
}

/// `JOB_META_<this>`: the metadata key upper-cased, every character but ASCII letters and digits turned to `_`.
pub fn env_name(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// Parses `##jobbroker:progress <percent> <message>` (percent 0-100, decimals and a `%` allowed; the message
/// optional). `None` for any other line.
pub fn parse_progress(line: &str) -> Option<(u32, String)> {
    let rest = line.trim_end_matches(['\r', '\n']).strip_prefix(PROGRESS_PREFIX)?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim_start();
    let (percent, message) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let percent: f64 = percent.strip_suffix('%').unwrap_or(percent).parse().ok().filter(|p: &f64| p.is_finite())?;
    Some((percent.clamp(0.0, 100.0).round() as u32, message.trim().to_owned()))
}

/// Reads all of `source`, keeping the first `max` bytes in `into` (the rest is read and dropped, so the
/// command never blocks on a full pipe). Returns whether anything was dropped.
async fn read_bounded(mut source: impl AsyncRead + Unpin, max: usize, into: &mut Vec<u8>) -> bool {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut truncated = false;
    while let Ok(n @ 1..) = source.read(&mut buffer).await {
        let room = max.saturating_sub(into.len());
        truncated |= n > room;
        into.extend_from_slice(&buffer[..n.min(room)]);
    }
    truncated
}

/// Reads stderr line by line: progress lines go to the job, everything else to the error tail.
async fn watch_stderr(mut stderr: ChildStderr, job: &ActiveJob, tail: &mut Tail) {
    let mut buffer = vec![0u8; 8 * 1024];
    let mut line = Vec::new();
    let take = |line: &[u8], tail: &mut Tail| match std::str::from_utf8(line).ok().and_then(parse_progress) {
        Some((percent, message)) => job.report_progress(percent, message),
        None => tail.push(line),
    };
    while let Ok(n @ 1..) = stderr.read(&mut buffer).await {
        for piece in buffer[..n].split_inclusive(|&b| b == b'\n') {
            line.extend_from_slice(piece);
            if piece.ends_with(b"\n") || line.len() > MAX_LINE {
                take(&line, tail);
                line.clear();
            }
        }
    }
    if !line.is_empty() {
        take(&line, tail);
    }
}

/// The last `limit` bytes of a stream.
pub struct Tail {
    bytes: Vec<u8>,
    limit: usize,
}

impl Tail {
    pub fn new(limit: usize) -> Tail {
        Tail { bytes: Vec::new(), limit }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        if self.bytes.len() > 2 * self.limit {
            self.bytes.drain(..self.bytes.len() - self.limit);
        }
    }

    /// The tail as text, trimmed, starting on a character boundary.
    pub fn text(&self) -> String {
        let mut tail = &self.bytes[self.bytes.len().saturating_sub(self.limit)..];
        if tail.len() < self.bytes.len() {
            // Cut mid-stream: skip UTF-8 continuation bytes so the text does not start with a broken character.
            while let [first, rest @ ..] = tail
                && first & 0xC0 == 0x80
            {
                tail = rest;
            }
        }
        text(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_to_outcomes() {
        let codes = [65];
        assert_eq!(exit_outcome(Exit::Code(0), b"out".to_vec(), "noise", &codes), Outcome::Success(b"out".to_vec()));
        assert_eq!(
            exit_outcome(Exit::Code(65), Vec::new(), "bad input", &codes),
            Outcome::Failure { message: "bad input".into(), non_retryable: true, retry_after: None }
        );
        assert_eq!(exit_outcome(Exit::Code(1), Vec::new(), "boom", &codes), Outcome::retry("boom"));
        assert_eq!(exit_outcome(Exit::Code(3), Vec::new(), "", &codes), Outcome::retry("exited with code 3"));
        assert_eq!(exit_outcome(Exit::Signal(9), Vec::new(), "", &codes), Outcome::retry("killed by signal 9"));
        assert_eq!(exit_outcome(Exit::Code(65), Vec::new(), "", &[]), Outcome::retry("exited with code 65"));
        assert!(matches!(
            exit_outcome(Exit::Code(3), Vec::new(), "", &[3, 4]),
            Outcome::Failure { non_retryable: true, .. }
        ));
    }

    #[test]
    fn metadata_keys_become_env_names() {
        assert_eq!(env_name("trace-id"), "TRACE_ID");
        assert_eq!(env_name("Customer.Name"), "CUSTOMER_NAME");
        assert_eq!(env_name("a b/c=d"), "A_B_C_D");
        assert_eq!(env_name("größe"), "GR__E");
        assert_eq!(env_name("x9"), "X9");
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_progress("##jobbroker:progress 42 resizing"), Some((42, "resizing".into())));
        assert_eq!(parse_progress("##jobbroker:progress 50 two words here\n"), Some((50, "two words here".into())));
        assert_eq!(parse_progress("##jobbroker:progress 7\r\n"), Some((7, String::new())));
        assert_eq!(parse_progress("##jobbroker:progress  12.6%\tnearly"), Some((13, "nearly".into())));
        assert_eq!(parse_progress("##jobbroker:progress 250 over"), Some((100, "over".into())));
        assert_eq!(parse_progress("##jobbroker:progress -5 under"), Some((0, "under".into())));
        assert_eq!(parse_progress("##jobbroker:progress half done"), None);
        assert_eq!(parse_progress("##jobbroker:progress"), None);
        assert_eq!(parse_progress("##jobbroker:progress50 x"), None);
        assert_eq!(parse_progress("##jobbroker:progress NaN x"), None);
        assert_eq!(parse_progress("progress 50 x"), None);
        assert_eq!(parse_progress(" ##jobbroker:progress 50 x"), None);
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_on_a_char_boundary() {
        let mut tail = Tail::new(8);
        tail.push(b"first line\n");
        tail.push(b"second\n");
        assert_eq!(tail.text(), "second");
        let mut tail = Tail::new(4);
        tail.push("aé€".as_bytes()); // 1 + 2 + 3 bytes: the last 4 start inside 'é'
        assert_eq!(tail.text(), "€");
        let mut tail = Tail::new(4096);
        for _ in 0..10_000 {
            tail.push(b"0123456789\n");
        }
        assert!(tail.text().len() <= 4096 && tail.text().ends_with("0123456789"));
        assert_eq!(Tail::new(10).text(), "");
    }
}
