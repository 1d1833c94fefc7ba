//! The agent's configuration: command-line flags (each also an environment variable) and the TOML handler file,
//! validated once into [`Settings`] that the rest of the agent trusts.
//!
//! Errors name the flag or the key that is wrong (`kinds.resize.command: …`). Nothing here runs a job or talks
//! to a broker.

use std::{
    collections::BTreeMap,
    ffi::{CStr, CString, OsStr},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use jobbroker::{
    client::{ClientArgs, ClientError},
    worker::WorkerOptions,
};
use reqwest::{
    Url,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::Deserialize;

/// Exit code a command uses to say "this job can never succeed" (`EX_DATAERR` from sysexits.h).
pub const DEFAULT_NON_RETRYABLE_EXIT_CODES: [i32; 1] = [65];
const DEFAULT_CAPACITY: u32 = 4;
/// Longest queue or kind name the broker accepts (SPEC: `[A-Za-z0-9_.:-]{1,128}`).
const MAX_NAME: usize = 128;

#[derive(Debug, Parser)]
#[command(
    name = "worker-agent",
    version,
    about = "Runs jobbroker jobs with a command or an HTTP endpoint: holds the lease stream, heartbeats, \
             enforces timeouts, drains on SIGTERM"
)]
pub struct Args {
    /// Broker address, `http://host:port` or `https://host:port` (TLS) (repeatable; tried in turn when one goes
    /// away).
    #[arg(long = "broker", env = "JOBBROKER_BROKERS", value_delimiter = ',', default_value = "http://127.0.0.1:50051")]
    pub brokers: Vec<String>,
    /// Token and TLS flags, the same for every broker.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue to take jobs from (repeatable). Required here or as `queues` in the config file.
    #[arg(long = "queue", env = "JOBBROKER_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Most jobs running at once [default: 4, or `capacity` in the config file].
    #[arg(long, env = "JOBBROKER_CAPACITY")]
    pub capacity: Option<u32>,
    /// Identity shown to operators [default: hostname-<random>].
    #[arg(long, env = "JOBBROKER_WORKER_ID")]
    pub worker_id: Option<String>,
    /// TOML file with a handler per job kind.
    #[arg(long, env = "JOBBROKER_AGENT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Default handler: run this shell command (`sh -c`) with the payload on stdin.
    #[arg(long, env = "JOBBROKER_EXEC", value_name = "SHELL COMMAND")]
    pub exec: Option<String>,
    /// Run every `exec` command as this user (a name or a uid), with its primary group, no supplementary groups
    /// and its HOME. The agent must run as root to switch users.
    #[arg(long, env = "JOBBROKER_EXEC_USER", value_name = "USER")]
    pub exec_user: Option<String>,
    /// Default handler: POST the payload to this URL.
    #[arg(long = "http", env = "JOBBROKER_HTTP_URL", value_name = "URL")]
    pub http: Option<String>,
    /// Default handler: the payload is `{"url": …, "data": …}`; POST `data` to `url`.
    #[arg(long, env = "JOBBROKER_HTTP_CALLBACK")]
    pub http_callback: bool,
    /// After SIGTERM, how long running jobs may finish before the rest are released.
    #[arg(long, env = "JOBBROKER_DRAIN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,
    /// Most bytes of a command's stdout (or an HTTP response body) kept as the job's result.
    #[arg(long, env = "JOBBROKER_MAX_OUTPUT_BYTES", default_value_t = 1_048_576)]
    pub max_output_bytes: usize,
    /// Timeout of an HTTP call (the job's execution timeout wins when shorter).
    #[arg(long, env = "JOBBROKER_HTTP_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub http_timeout: Duration,
    /// Log JSON lines instead of text (to stderr; filter with RUST_LOG).
    #[arg(long, env = "JOBBROKER_LOG_JSON")]
    pub log_json: bool,
}

/// Everything the agent runs with, validated.
#[derive(Debug)]
pub struct Settings {
    pub worker: WorkerOptions,
    pub handlers: Handlers,
    /// Whom `exec` commands run as; `None`: the agent's own user.
    pub exec_user: Option<ExecUser>,
    pub drain_grace: Duration,
    pub max_output_bytes: usize,
    pub log_json: bool,
}

/// Which handler runs which job kind.
#[derive(Debug, Default)]
pub struct Handlers {
    pub kinds: BTreeMap<String, Route>,
    /// For every kind `kinds` does not name; `None`: such jobs fail with "no handler for kind …".
    pub default: Option<Route>,
}

/// One handler and its optional concurrency limit (inside the agent's capacity).
#[derive(Debug)]
pub struct Route {
    pub handler: HandlerSpec,
    pub concurrency: Option<u32>,
}

#[derive(Debug)]
pub enum HandlerSpec {
    Exec(ExecSpec),
    Http(HttpSpec),
    HttpCallback(CallbackSpec),
}

#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub program: Program,
    /// Exit codes that mean "never retry this job".
    pub non_retryable_exit_codes: Vec<i32>,
    /// Extra environment, set after the `JOB_*` variables (so it may override them).
    pub env: BTreeMap<String, String>,
}

/// A user `exec` commands run as (`--exec-user`), looked up at start.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl ExecUser {
    /// Looks `user` up in the user database (`getpwnam`, or `getpwuid` for a number), and checks that this
    /// process may run commands as it.
    pub fn lookup(user: &str) -> Result<ExecUser, ConfigError> {
        let key = "--exec-user";
        let found = match user.parse::<u32>() {
            Ok(uid) => passwd_entry(|entry, buf, len, result| {
                // SAFETY: every pointer is to a live local of `passwd_entry` with `len` bytes behind `buf`.
                unsafe { libc::getpwuid_r(uid, entry, buf, len, result) }
            }),
            Err(_) => {
                let name = CString::new(user).map_err(|_| invalid(key, "must not contain a NUL"))?;
                passwd_entry(|entry, buf, len, result| {
                    // SAFETY: as above; `name` is a NUL-terminated string that outlives the call.
                    unsafe { libc::getpwnam_r(name.as_ptr(), entry, buf, len, result) }
                })
            }
        };
        let found = found.map_err(|e| invalid(key, format!("cannot read the user database: {e}")))?;
        let user = found.ok_or_else(|| invalid(key, format!("no user {user:?} on this machine")))?;
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        if me != 0 && me != user.uid {
            return Err(invalid(
                key,
                format!("the agent runs as uid {me}, not root, and cannot run commands as another user"),
            ));
        }
        Ok(user)
    }
}

/// Calls a `getpw*_r` function with room for its strings (growing it on ERANGE); `None` if there is no such user.
fn passwd_entry(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, libc::size_t, *mut *mut libc::passwd) -> libc::c_int,
) -> std::io::Result<Option<ExecUser>> {
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: `passwd` is plain old data; all-zero is a valid value to be overwritten.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        match call(&mut entry, buf.as_mut_ptr(), buf.len(), &mut result) {
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            0 if result.is_null() => return Ok(None),
            0 => {
                // SAFETY: on success the string fields point to NUL-terminated strings inside `buf`.
                let text = |field: *const libc::c_char| unsafe { CStr::from_ptr(field) };
                return Ok(Some(ExecUser {
                    name: text(entry.pw_name).to_string_lossy().into_owned(),
                    uid: entry.pw_uid,
                    gid: entry.pw_gid,
                    home: PathBuf::from(OsStr::from_bytes(text(entry.pw_dir).to_bytes())),
                }));
            }
            error => return Err(std::io::Error::from_raw_os_error(error)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Program {
    /// Run directly, no shell.
    Argv(Vec<String>),
    /// Run with `sh -c`.
    Shell(String),
}

#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub url: Url,
    pub headers: HeaderMap,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CallbackSpec {
    pub headers: HeaderMap,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `key` is a flag (`--queue`) or a config file key (`kinds.resize.command`).
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("cannot read the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

/// The config file as written (every key optional; unknown keys are errors).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub queues: Option<Vec<String>>,
    pub capacity: Option<u32>,
    #[serde(default)]
    pub kinds: BTreeMap<String, RawHandler>,
    pub default: Option<RawHandler>,
}

/// One `[kinds.<kind>]` or `[default]` table as written; [`RawHandler::validate`] checks which keys fit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHandler {
    pub handler: Option<String>,
    pub command: Option<Vec<String>>,
    pub shell: Option<String>,
    pub concurrency: Option<u32>,
    pub non_retryable_exit_codes: Option<Vec<i32>>,
    pub env: Option<BTreeMap<String, String>>,
    pub url: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout: Option<String>,
}

impl FileConfig {
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        FileConfig::parse(&text, path)
    }
}

impl Settings {
    /// Reads the config file the arguments name (if any) and validates the whole.
    pub fn from_args(args: Args) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Settings::new(args, file)
    }

    /// Validates flags and file together. Flags win over the file (`queues`, `capacity`, the default handler).
    pub fn new(args: Args, file: FileConfig) -> Result<Settings, ConfigError> {
        let brokers = non_empty(args.brokers).into_iter().map(broker_url).collect::<Result<Vec<_>, _>>()?;
        if brokers.is_empty() {
            return Err(invalid("--broker", "at least one broker address is needed"));
        }
        let (queues, queues_key) = match non_empty(args.queues) {
            queues if !queues.is_empty() => (queues, "--queue"),
            _ => (file.queues.map(non_empty).unwrap_or_default(), "queues"),
        };
        if queues.is_empty() {
            return Err(invalid("--queue", "no queue given (use --queue, JOBBROKER_QUEUES or `queues` in --config)"));
        }
        for queue in &queues {
            check_name(queues_key, queue)?;
        }
        let (capacity, capacity_key) = match (args.capacity, file.capacity) {
            (Some(capacity), _) => (capacity, "--capacity"),
            (None, Some(capacity)) => (capacity, "capacity"),
            (None, None) => (DEFAULT_CAPACITY, "--capacity"),
        };
        if capacity == 0 {
            return Err(invalid(capacity_key, "must be at least 1"));
        }
        let connect = args.client.options(&brokers)?;
        let mut worker = WorkerOptions::new(brokers, queues, capacity);
        worker.connect = connect;
        if let Some(id) = args.worker_id {
            if id.trim().is_empty() || id.len() > 2 * MAX_NAME {
                return Err(invalid("--worker-id", format!("must be 1 to {} bytes", 2 * MAX_NAME)));
            }
            worker.worker_id = id;
        }
        if args.max_output_bytes == 0 {
            return Err(invalid("--max-output-bytes", "must be at least 1"));
        }
        if args.http_timeout.is_zero() {
            return Err(invalid("--http-timeout", "must be positive"));
        }

        let mut handlers = Handlers::default();
        for (kind, raw) in file.kinds {
            let key = format!("kinds.{kind}");
            check_name(&key, &kind)?;
            handlers.kinds.insert(kind, raw.validate(&key, args.http_timeout)?);
        }
        handlers.default = match default_from_flags(args.exec, args.http, args.http_callback, args.http_timeout)? {
            Some(route) => Some(route),
            None => file.default.map(|raw| raw.validate("default", args.http_timeout)).transpose()?,
        };
        if handlers.kinds.is_empty() && handlers.default.is_none() {
            return Err(invalid(
                "--exec",
                "no handler: pass --exec, --http or --http-callback, or a --config file with [kinds.*] or [default]",
            ));
        }
        let exec_user = args.exec_user.as_deref().map(ExecUser::lookup).transpose()?;
        Ok(Settings {
            worker,
            handlers,
            exec_user,
            drain_grace: args.drain_grace,
            max_output_bytes: args.max_output_bytes,
            log_json: args.log_json,
        })
    }
}

/// The default handler named by `--exec`, `--http` or `--http-callback` (at most one).
fn default_from_flags(
    exec: Option<String>,
    http: Option<String>,
    callback: bool,
    timeout: Duration,
) -> Result<Option<Route>, ConfigError> {
    let given =
        [exec.is_some().then_some("--exec"), http.is_some().then_some("--http"), callback.then_some("--http-callback")];
    let given: Vec<&str> = given.into_iter().flatten().collect();
    if given.len() > 1 {
        return Err(invalid(given[1], format!("only one default handler may be given (also got {})", given[0])));
    }
    let handler = if let Some(shell) = exec {
        if shell.trim().is_empty() {
            return Err(invalid("--exec", "must not be empty"));
        }
        HandlerSpec::Exec(ExecSpec {
            program: Program::Shell(shell),
            non_retryable_exit_codes: DEFAULT_NON_RETRYABLE_EXIT_CODES.to_vec(),
            env: BTreeMap::new(),
        })
    } else if let Some(url) = http {
        HandlerSpec::Http(HttpSpec { url: http_url("--http", &url)?, headers: HeaderMap::new(), timeout })
    } else if callback {
        HandlerSpec::HttpCallback(CallbackSpec { headers: HeaderMap::new(), timeout })
    } else {
        return Ok(None);
    };
    Ok(Some(Route { handler, concurrency: None }))
}

impl RawHandler {
    /// Checks the table at `key` (`kinds.resize`, `default`): a known handler, its required keys, no keys that
    /// belong to another handler.
    pub fn validate(self, key: &str, default_timeout: Duration) -> Result<Route, ConfigError> {
        let at = |name: &str| format!("{key}.{name}");
        let concurrency = match self.concurrency {
            Some(0) => return Err(invalid(at("concurrency"), "must be at least 1")),
            other => other,
        };
        let handler = self
            .handler
            .as_deref()
            .ok_or_else(|| invalid(at("handler"), "missing (one of \"exec\", \"http\", \"http_callback\")"))?;
        let present = [
            ("command", self.command.is_some()),
            ("shell", self.shell.is_some()),
            ("non_retryable_exit_codes", self.non_retryable_exit_codes.is_some()),
            ("env", self.env.is_some()),
            ("url", self.url.is_some()),
            ("headers", self.headers.is_some()),
            ("timeout", self.timeout.is_some()),
        ];
        let allowed: &[&str] = match handler {
            "exec" => &["command", "shell", "non_retryable_exit_codes", "env"],
            "http" => &["url", "headers", "timeout"],
            "http_callback" => &["headers", "timeout"],
            other => {
                return Err(invalid(
                    at("handler"),
                    format!("unknown handler {other:?} (expected \"exec\", \"http\" or \"http_callback\")"),
                ));
            }
        };
        if let Some((name, _)) = present.iter().find(|(name, set)| *set && !allowed.contains(name)) {
            return Err(invalid(at(name), format!("not a setting of the {handler} handler")));
        }
        let handler = match handler {
            "exec" => HandlerSpec::Exec(ExecSpec {
                program: match (self.command, self.shell) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(at("shell"), "give either `command` or `shell`, not both"));
                    }
                    (None, None) => return Err(invalid(at("command"), "missing (or give `shell`)")),
                    (Some(argv), None) if argv.first().is_none_or(|program| program.is_empty()) => {
                        return Err(invalid(at("command"), "must name a program: [\"program\", \"arg\", …]"));
                    }
                    (Some(argv), None) => Program::Argv(argv),
                    (None, Some(shell)) if shell.trim().is_empty() => {
                        return Err(invalid(at("shell"), "must not be empty"));
                    }
                    (None, Some(shell)) => Program::Shell(shell),
                },
                non_retryable_exit_codes: match self.non_retryable_exit_codes {
                    Some(codes) => {
                        if let Some(code) = codes.iter().find(|code| !(1..=255).contains(*code)) {
                            return Err(invalid(at("non_retryable_exit_codes"), format!("{code} is not in 1..=255")));
                        }
                        codes
                    }
                    None => DEFAULT_NON_RETRYABLE_EXIT_CODES.to_vec(),
                },
                env: {
                    let env = self.env.unwrap_or_default();
                    if let Some(name) = env.keys().find(|name| name.is_empty() || name.contains(['=', '\0'])) {
                        return Err(invalid(at("env"), format!("{name:?} is not a valid variable name")));
                    }
                    env
                },
            }),
            "http" => {
                let url = self.url.ok_or_else(|| invalid(at("url"), "missing"))?;
                HandlerSpec::Http(HttpSpec {
                    url: http_url(&at("url"), &url)?,
                    headers: headers(&at("headers"), self.headers)?,
                    timeout: timeout(&at("timeout"), self.timeout, default_timeout)?,
                })
            }
            _ => HandlerSpec::HttpCallback(CallbackSpec {
                headers: headers(&at("headers"), self.headers)?,
                timeout: timeout(&at("timeout"), self.timeout, default_timeout)?,
            }),
        };
        Ok(Route { handler, concurrency })
    }
}

/// Trims entries and drops empty ones (`JOBBROKER_QUEUES="a, b,"`).
fn non_empty(values: Vec<String>) -> Vec<String> {
    values.into_iter().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect()
}

/// `host:port` becomes `http://host:port`; anything else must be an `http://` or `https://` (TLS) URL.
fn broker_url(text: String) -> Result<String, ConfigError> {
    let url = if text.contains("://") { text } else { format!("http://{text}") };
    match Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => Ok(url),
        Ok(parsed) => Err(invalid(
            "--broker",
            format!("{url:?}: expected http://host:port or https://host:port (got {})", parsed.scheme()),
        )),
        Err(e) => Err(invalid("--broker", format!("{url:?} is not a URL: {e}"))),
    }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid =
        (1..=MAX_NAME).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if valid { Ok(()) } else { Err(invalid(key, format!("{name:?} must match [A-Za-z0-9_.:-]{{1,{MAX_NAME}}}"))) }
}

/// An `http://` or `https://` URL. The error says what is wrong without echoing the URL: its user info, path or
/// query may hold a secret (and a callback URL comes from a job's payload, whose failures are recorded and logged).
pub(crate) fn http_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    const EXPECTED: &str = "expected http:// or https://";
    let url = Url::parse(text).map_err(|e| invalid(key, format!("not a valid URL ({e}); {EXPECTED}")))?;
    match url.scheme() {
        // The parser insists on a host for these.
        "http" | "https" => Ok(url),
        scheme if url.has_authority() => Err(invalid(key, format!("the URL has scheme {scheme}; {EXPECTED}"))),
        // Without `//`, what parsed as a scheme may be a user name (`user:password@host`): not named.
        _ => Err(invalid(key, format!("not a URL with a host; {EXPECTED}"))),
    }
}

fn headers(key: &str, raw: Option<BTreeMap<String, String>>) -> Result<HeaderMap, ConfigError> {
    let mut map = HeaderMap::new();
    for (name, value) in raw.unwrap_or_default() {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("{key}.{name}"), "not a valid header name"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| invalid(format!("{key}.{name}"), "not a valid header value (no control characters)"))?;
        map.insert(header, value);
    }
    Ok(map)
}

fn timeout(key: &str, raw: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(text) = raw else { return Ok(default) };
    match humantime::parse_duration(&text) {
        Ok(d) if d.is_zero() => Err(invalid(key, "must be positive")),
        Ok(d) => Ok(d),
        Err(e) => Err(invalid(key, format!("{text:?} is not a duration like \"30s\": {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("worker-agent").chain(list.iter().copied())).expect("valid arguments")
    }

    fn settings(list: &[&str], toml: &str) -> Result<Settings, ConfigError> {
        Settings::new(args(list), FileConfig::parse(toml, Path::new("agent.toml"))?)
    }

    fn error(list: &[&str], toml: &str) -> String {
        settings(list, toml).expect_err("an invalid configuration").to_string()
    }

    const FULL: &str = r#"
        queues = ["images", "emails"]
        capacity = 8

        [kinds.resize]
        handler = "exec"
        command = ["convert", "-resize", "50%", "-", "-"]
        concurrency = 2
        non_retryable_exit_codes = [65, 66]
        env = { MAGICK_THREAD_LIMIT = "1" }

        [kinds.notify]
        handler = "http"
        url = "http://notifier.internal/jobs"
        headers = { Authorization = "Bearer x" }
        timeout = "30s"

        [kinds.webhook]
        handler = "http_callback"

        [default]
        handler = "exec"
        shell = "echo unknown kind >&2; exit 65"
    "#;

    #[test]
    fn the_documented_example_parses() {
        let s = settings(&[], FULL).expect("valid");
        assert_eq!(s.worker.queues, ["images", "emails"]);
        assert_eq!(s.worker.capacity, 8);
        assert_eq!(s.worker.brokers, ["http://127.0.0.1:50051"]);
        let resize = &s.handlers.kinds["resize"];
        assert_eq!(resize.concurrency, Some(2));
        let HandlerSpec::Exec(exec) = &resize.handler else { panic!("resize is exec") };
        assert_eq!(exec.program, Program::Argv(["convert", "-resize", "50%", "-", "-"].map(String::from).to_vec()));
        assert_eq!(exec.non_retryable_exit_codes, [65, 66]);
        assert_eq!(exec.env["MAGICK_THREAD_LIMIT"], "1");
        let HandlerSpec::Http(http) = &s.handlers.kinds["notify"].handler else { panic!("notify is http") };
        assert_eq!(http.url.as_str(), "http://notifier.internal/jobs");
        assert_eq!(http.headers["authorization"], "Bearer x");
        assert_eq!(http.timeout, Duration::from_secs(30));
        let HandlerSpec::HttpCallback(callback) = &s.handlers.kinds["webhook"].handler else { panic!("callback") };
        assert_eq!(callback.timeout, Duration::from_secs(60), "--http-timeout is the default");
        let default = s.handlers.default.as_ref().expect("a default");
        let HandlerSpec::Exec(exec) = &default.handler else { panic!("the default is exec") };
        assert_eq!(exec.program, Program::Shell("echo unknown kind >&2; exit 65".into()));
        assert_eq!(exec.non_retryable_exit_codes, [65]);
    }

    #[test]
    fn flags_win_over_the_file() {
        let s = settings(&["--queue", "a", "--queue", "b", "--capacity", "3", "--exec", "cat"], FULL).expect("valid");
        assert_eq!(s.worker.queues, ["a", "b"]);
        assert_eq!(s.worker.capacity, 3);
        let HandlerSpec::Exec(exec) = &s.handlers.default.as_ref().expect("a default").handler else { panic!() };
        assert_eq!(exec.program, Program::Shell("cat".into()));
    }

    #[test]
    fn flags_alone_are_enough() {
        let s = settings(&["--queue", "q1,q2", "--broker", "10.0.0.1:50051,http://b:1", "--http-callback"], "")
            .expect("valid");
        assert_eq!(s.worker.queues, ["q1", "q2"]);
        assert_eq!(s.worker.brokers, ["http://10.0.0.1:50051", "http://b:1"]);
        assert_eq!(s.worker.capacity, 4);
        assert!(matches!(s.handlers.default.expect("a default").handler, HandlerSpec::HttpCallback(_)));
        assert!(s.worker.worker_id.len() > 9, "hostname-<random>: {}", s.worker.worker_id);
    }

    #[test]
    fn durations_and_sizes_parse() {
        let s = settings(
            &["--queue=q", "--exec=true", "--drain-grace=1m 30s", "--max-output-bytes=10", "--http-timeout=500ms"],
            "",
        )
        .expect("valid");
        assert_eq!(s.drain_grace, Duration::from_secs(90));
        assert_eq!(s.max_output_bytes, 10);
        let s = settings(&["--queue=q", "--http=http://x/y", "--http-timeout=500ms"], "").expect("valid");
        let HandlerSpec::Http(http) = s.handlers.default.expect("a default").handler else { panic!() };
        assert_eq!(http.timeout, Duration::from_millis(500));
        assert!(Args::try_parse_from(["worker-agent", "--drain-grace", "soon"]).is_err());
    }

    #[test]
    fn missing_essentials_are_named() {
        assert!(error(&["--exec", "true"], "").starts_with("--queue: no queue"));
        assert!(error(&["--queue", "q"], "").starts_with("--exec: no handler"));
        assert!(error(&["--queue", "q", "--exec", "true", "--capacity", "0"], "").starts_with("--capacity:"));
        assert!(error(&["--exec", "true"], "queues = [\"q\"]\ncapacity = 0").starts_with("capacity:"));
        assert!(error(&["--queue", "bad queue", "--exec", "true"], "").starts_with("--queue: \"bad queue\""));
        assert!(error(&["--queue", "q", "--exec", "true", "--broker", "ftp://b:1"], "").starts_with("--broker:"));
    }

    #[test]
    fn exec_user_is_looked_up_and_checked() {
        let with = |user: &str| settings(&["--queue", "q", "--exec", "id", "--exec-user", user], "");
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        let by_uid = with(&me.to_string()).expect("the agent's own uid").exec_user.expect("a user");
        assert_eq!(by_uid.uid, me);
        let by_name = with(&by_uid.name).expect("the agent's own user name").exec_user.expect("a user");
        assert_eq!(by_name, by_uid);
        assert!(settings(&["--queue", "q", "--exec", "id"], "").expect("valid").exec_user.is_none());

        let e = with("no-such-user-4f1").expect_err("an unknown user").to_string();
        assert_eq!(e, "--exec-user: no user \"no-such-user-4f1\" on this machine");
        let other = if me == 0 { "nobody" } else { "root" };
        match with(other) {
            Ok(s) => assert!(me == 0 && s.exec_user.is_some_and(|u| u.name == "nobody" && u.uid != 0)),
            Err(e) => {
                assert!(me != 0, "root may run commands as anyone: {e}");
                assert!(e.to_string().contains("cannot run commands as another user"), "{e}");
            }
        }
    }

    #[test]
    fn token_and_tls_flags() {
        fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            [&["--queue", "q", "--exec", "true"][..], extra].concat()
        }
        let s =
            settings(&with(&["--broker", "https://b:1", "--token", "t0ken", "--tls-domain", "broker.internal"]), "")
                .expect("valid");
        assert_eq!(s.worker.brokers, ["https://b:1"]);
        let shown = format!("{s:?}");
        assert!(shown.contains("Bearer(..)") && shown.contains("broker.internal"), "{shown}");
        assert!(!shown.contains("t0ken"), "the token is never shown: {shown}");

        let e = error(&with(&["--tls-domain", "x"]), "");
        assert_eq!(e, "--tls-domain: applies to https:// brokers only, and http://127.0.0.1:50051 is plaintext");
        let e = error(&with(&["--broker", "https://b:1", "--tls-ca", "/nonexistent/ca.pem"]), "");
        assert!(e.starts_with("cannot read --tls-ca /nonexistent/ca.pem:"), "{e}");
        let e = error(&with(&["--token", "two words"]), "");
        assert!(e.starts_with("--token: a token must be"), "{e}");
        assert!(Args::try_parse_from(["worker-agent", "--tls-client-cert", "c.pem"]).is_err(), "needs the key");
    }

    #[test]
    fn only_one_default_handler_by_flags() {
        let e = error(&["--queue", "q", "--exec", "true", "--http", "http://x"], "");
        assert!(e.starts_with("--http: only one default handler"), "{e}");
        let e = error(&["--queue", "q", "--http", "http://x", "--http-callback"], "");
        assert!(e.starts_with("--http-callback: only one"), "{e}");
        assert_eq!(
            error(&["--queue", "q", "--http", "ftp://x"], ""),
            "--http: the URL has scheme ftp; expected http:// or https://"
        );
    }

    #[test]
    fn bad_urls_are_explained_without_being_echoed() {
        let cases = [
            ("ftp://user:s3cret@files.example/x?token=t0p", "the URL has scheme ftp; expected http:// or https://"),
            ("admin:s3cret@hooks.example/x", "not a URL with a host; expected http:// or https://"),
            ("http://user:s3cret@bad host/?token=t0p", "not a valid URL (invalid international domain name)"),
            ("http://", "not a valid URL (empty host); expected"),
        ];
        for (url, expected) in cases {
            let e = http_url("u", url).expect_err("an invalid URL").to_string();
            assert!(e.starts_with(&format!("u: {expected}")), "for {url:?}: {e:?}");
            assert!(!e.contains("s3cret") && !e.contains("t0p") && !e.contains("admin"), "echoed: {e:?}");
        }
        assert_eq!(http_url("u", "https://user:pw@h.example/a?b=1").expect("valid").host_str(), Some("h.example"));
    }

    #[test]
    fn bad_handler_tables_name_the_key() {
        let cases = [
            ("[kinds.a]\ncommand = [\"x\"]", "kinds.a.handler: missing"),
            ("[kinds.a]\nhandler = \"grpc\"", "kinds.a.handler: unknown handler \"grpc\""),
            ("[kinds.a]\nhandler = \"exec\"", "kinds.a.command: missing"),
            ("[kinds.a]\nhandler = \"exec\"\ncommand = []", "kinds.a.command: must name a program"),
            ("[kinds.a]\nhandler = \"exec\"\ncommand = [\"x\"]\nshell = \"x\"", "kinds.a.shell: give either"),
            (
                "[kinds.a]\nhandler = \"exec\"\nshell = \"x\"\nurl = \"http://x\"",
                "kinds.a.url: not a setting of the exec",
            ),
            (
                "[kinds.a]\nhandler = \"exec\"\nshell = \"x\"\nconcurrency = 0",
                "kinds.a.concurrency: must be at least 1",
            ),
            ("[kinds.a]\nhandler = \"exec\"\nshell = \"x\"\nnon_retryable_exit_codes = [0]", "kinds.a.non_retryable"),
            ("[kinds.a]\nhandler = \"http\"", "kinds.a.url: missing"),
            (
                "[kinds.a]\nhandler = \"http\"\nurl = \"nope\"",
                "kinds.a.url: not a valid URL (relative URL without a base)",
            ),
            ("[kinds.a]\nhandler = \"http\"\nurl = \"http://x\"\ntimeout = \"soon\"", "kinds.a.timeout: \"soon\""),
            (
                "[kinds.a]\nhandler = \"http\"\nurl = \"http://x\"\nshell = \"x\"",
                "kinds.a.shell: not a setting of the http",
            ),
            (
                "[kinds.a]\nhandler = \"http\"\nurl = \"http://x\"\nheaders = { \"a b\" = \"1\" }",
                "kinds.a.headers.a b:",
            ),
            (
                "[kinds.a]\nhandler = \"http_callback\"\nurl = \"http://x\"",
                "kinds.a.url: not a setting of the http_callback",
            ),
            ("[kinds.\"bad kind\"]\nhandler = \"http_callback\"", "kinds.bad kind: \"bad kind\" must match"),
            ("[default]\nhandler = \"exec\"", "default.command: missing"),
        ];
        for (toml, expected) in cases {
            let e = error(&["--queue", "q"], toml);
            assert!(e.starts_with(expected), "for\n{toml}\nexpected {expected:?}, got {e:?}");
        }
    }

    #[test]
    fn toml_errors_name_the_file_and_the_key() {
        let e = error(&["--queue", "q"], "[kinds.a]\nhandler = \"exec\"\nshel = \"x\"");
        assert!(e.starts_with("config file agent.toml:") && e.contains("shel"), "{e}");
        let e = error(&["--queue", "q"], "capacity = \"many\"");
        assert!(e.contains("capacity"), "{e}");
        let e = Settings::from_args(args(&["--queue", "q", "--config", "/nonexistent/agent.toml"]))
            .expect_err("a missing file")
            .to_string();
        assert!(e.starts_with("cannot read the config file /nonexistent/agent.toml"), "{e}");
    }
}
