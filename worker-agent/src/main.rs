//! `worker-agent`: see the crate docs (`src/lib.rs`) and `worker-agent --help`.

use std::process::ExitCode;

use clap::Parser as _;
use worker_agent::{
    config::{Args, Settings},
    handlers::guard,
};

fn main() -> ExitCode {
    // The agent starts a copy of itself as its process group guard (see `handlers::guard`).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|arg| arg == guard::GUARD_ARG) && args.next().is_none() {
        return guard::serve();
    }
    agent()
}

#[tokio::main]
async fn agent() -> ExitCode {
    let args = Args::parse();
    worker_agent::init_logging(args.log_json);
    hide_from_jobs();
    let settings = match Settings::from_args(args) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("worker-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match worker_agent::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Jobs' commands run as the agent's user, so they could read the agent's token from `/proc/<agent>/environ` or
/// its memory. A process that is not dumpable has those files owned by root (and writes no core dump); its
/// children are dumpable again once they exec.
fn hide_from_jobs() {
    // SAFETY: prctl(PR_SET_DUMPABLE) sets a flag of this process from plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "could not hide the agent's environment from its jobs (prctl PR_SET_DUMPABLE)");
    }
}
