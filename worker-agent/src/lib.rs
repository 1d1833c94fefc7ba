//! `worker-agent`: runs jobbroker jobs for teams that write no gRPC. It is `jobbroker::worker::run` (lease
//! stream, heartbeats, timeouts, completion, reconnection) plus handlers chosen per job kind: a command
//! ([`handlers::exec`]) or an HTTP endpoint ([`handlers::http`]), configured by flags and a TOML file
//! ([`config`]).
//!
//! The agent keeps no state of its own: kill it at any moment and the broker hands its leases to another worker.
//! SIGTERM drains: no new jobs, running ones get `--drain-grace` to finish, the rest are released (no attempt
//! used); a second SIGTERM or SIGINT releases at once.

pub mod config;
pub mod handlers;

use std::{io::IsTerminal as _, time::Duration};

use anyhow::Context as _;
use jobbroker::worker::{self, Control};
use tokio::signal::unix::{SignalKind, signal};

use crate::{config::Settings, handlers::Dispatcher};

/// After the agent was told to release its jobs, how long it waits for the broker to acknowledge before exiting
/// anyway (the broker then reassigns the leases when they expire).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs to stderr: text, or JSON lines with `json`; filtered by `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Runs the agent until it has drained after SIGTERM (or SIGINT).
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let dispatcher = Dispatcher::new(settings.handlers, settings.max_output_bytes, settings.exec_user)
        .context("starting the HTTP client")?;
    let control = Control::default();
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    tracing::info!(
        worker = %settings.worker.worker_id,
        brokers = ?settings.worker.brokers,
        queues = ?settings.worker.queues,
        capacity = settings.worker.capacity,
        "worker agent starting"
    );
    let worker = worker::run(settings.worker, dispatcher, control.clone());
    tokio::pin!(worker);

    let stop_signal = async {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    };
    let signal = tokio::select! {
        result = &mut worker => return result.context("the worker stopped"),
        signal = stop_signal => signal,
    };
    tracing::info!(%signal, grace = %humantime::format_duration(settings.drain_grace), "draining: no new jobs");
    control.drain.cancel();
    let drained = tokio::select! {
        result = &mut worker => Some(result),
        () = tokio::time::sleep(settings.drain_grace) => {
            tracing::info!("drain grace over: releasing the jobs still running");
            None
        }
        _ = terminate.recv() => {
            tracing::info!("second signal: releasing the jobs still running");
            None
        }
        _ = interrupt.recv() => {
            tracing::info!("second signal: releasing the jobs still running");
            None
        }
    };
    if let Some(result) = drained {
        tracing::info!("drained");
        return result.context("the worker stopped");
    }
    control.abort.cancel();
    match tokio::time::timeout(RELEASE_TIMEOUT, &mut worker).await {
        Ok(result) => {
            tracing::info!("released; stopping");
            result.context("the worker stopped")
        }
        Err(_) => {
            tracing::warn!("no broker acknowledged the releases; exiting (the leases expire on the broker)");
            Ok(())
        }
    }
}
