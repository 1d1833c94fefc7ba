//! `worker-agent`: see the crate docs (`src/lib.rs`) and `worker-agent --help`.

use std::process::ExitCode;

use clap::Parser as _;
use worker_agent::config::{Args, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    worker_agent::init_logging(args.log_json);
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
