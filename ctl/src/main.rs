//! `jobctl`: the ops command line of jobbroker. Every AdminService call, plus enqueue, get, cancel, watch, health
//! and an end-to-end smoke test, against one broker. See README's "Operating a broker" section.

mod cli;
mod commands;
mod connect;
mod error;
mod render;
mod table;

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("jobctl: {error}");
            error.exit_code()
        }
    }
}
