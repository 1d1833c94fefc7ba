//! The agent's [`Handler`]: picks the handler configured for a job's kind, waits for that kind's concurrency
//! limit, and runs the job with a command ([`exec`]) or an HTTP call ([`http`]).
//!
//! Leases, heartbeats, timeouts and reporting are the worker loop's (`jobbroker::worker`); a handler only turns a
//! job into an [`Outcome`] and returns promptly once the job is told to stop.

pub mod exec;
pub mod guard;
pub mod http;

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use jobbroker::worker::{ActiveJob, Handler, Outcome, StopReason};
use tokio::sync::Semaphore;

use crate::config::{ExecUser, HandlerSpec, Handlers, Route};

/// Routes each job to the handler of its kind.
pub struct Dispatcher {
    kinds: HashMap<String, Arc<Runner>>,
    /// For kinds with no handler of their own; its concurrency limit is shared by all of them.
    default: Option<Arc<Runner>>,
}

/// A configured handler, ready to run jobs.
struct Runner {
    handler: Kind,
    /// The kind's concurrency limit, inside the agent's capacity.
    limit: Option<Semaphore>,
}

enum Kind {
    Exec(exec::Exec),
    Http(http::Http),
    Callback(http::Callback),
}

impl Dispatcher {
    pub fn new(
        handlers: Handlers,
        max_output_bytes: usize,
        exec_user: Option<ExecUser>,
    ) -> Result<Dispatcher, reqwest::Error> {
        // One HTTP client (one connection pool) for every HTTP handler.
        let client = http::client()?;
        // One process group guard for every command, started only if some kind runs commands.
        let exec = OnceLock::new();
        let runner = |route: Route| {
            let handler = match route.handler {
                HandlerSpec::Exec(spec) => {
                    let shared = exec.get_or_init(|| {
                        let guard = guard::Guard::start();
                        Arc::new(exec::Shared { max_output: max_output_bytes, guard, user: exec_user.clone() })
                    });
                    Kind::Exec(exec::Exec::new(spec, shared.clone()))
                }
                HandlerSpec::Http(spec) => Kind::Http(http::Http::new(client.clone(), spec, max_output_bytes)),
                HandlerSpec::HttpCallback(spec) => {
                    Kind::Callback(http::Callback::new(client.clone(), spec, max_output_bytes))
                }
            };
            let limit = route.concurrency.map(|n| Semaphore::new(n as usize));
            Arc::new(Runner { handler, limit })
        };
        Ok(Dispatcher {
            kinds: handlers.kinds.into_iter().map(|(kind, route)| (kind, runner(route))).collect(),
            default: handlers.default.map(runner),
        })
    }

    async fn dispatch(&self, job: ActiveJob) -> Outcome {
        let Some(runner) = self.kinds.get(job.kind()).or(self.default.as_ref()) else {
            tracing::warn!("no handler for this kind");
            return non_retryable(format!("no handler for kind {}", job.kind()));
        };
        // The lease is heartbeated by the worker loop while the job waits for a slot of its kind.
        let _permit = match &runner.limit {
            Some(limit) => tokio::select! {
                biased;
                () = job.stopped() => return stopped(&job),
                permit = limit.acquire() => Some(permit),
            },
            None => None,
        };
        if job.stop_reason().is_some() {
            return stopped(&job);
        }
        match &runner.handler {
            Kind::Exec(exec) => exec.run(&job).await,
            Kind::Http(http) => http.run(&job).await,
            Kind::Callback(callback) => callback.run(&job).await,
        }
    }
}

impl Handler for Dispatcher {
    fn handle(&self, job: ActiveJob) -> impl Future<Output = Outcome> + Send {
        self.dispatch(job)
    }
}

/// What a handler returns once its job was told to stop. The worker loop decides what is reported (release on
/// shutdown, a retryable failure on timeout, nothing for a lost lease); only a cancel reports this outcome.
pub(crate) fn stopped(job: &ActiveJob) -> Outcome {
    match job.stop_reason() {
        Some(StopReason::Cancelled) => non_retryable("cancelled"),
        _ => Outcome::Release,
    }
}

pub(crate) fn non_retryable(message: impl Into<String>) -> Outcome {
    Outcome::Failure { message: message.into(), non_retryable: true, retry_after: None }
}

/// Bytes as text for an error message: lossy UTF-8, trimmed.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}
