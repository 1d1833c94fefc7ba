//! Runs a parsed command line: connect once, call the broker, print the answer. One module per group of
//! commands; each command is a few lines that build a request, make one call and hand the answer to `render`.

mod admin;
mod health;
mod jobs;
mod smoke;

use crate::{
    cli::{Cli, Command},
    error::Error,
    render::Output,
};

pub async fn run(cli: Cli) -> Result<(), Error> {
    let out = Output { json: cli.json };
    let clients = cli.connect.connect().await?;
    match cli.command {
        Command::Queues => admin::queues(&clients, out).await,
        Command::Stats { queue } => admin::stats(&clients, out, queue).await,
        Command::Jobs(args) => admin::jobs(&clients, out, args).await,
        Command::Get { id } => jobs::get(&clients, out, id).await,
        Command::Cancel { id } => jobs::cancel(&clients, out, id).await,
        Command::Retry { id } => jobs::retry(&clients, out, id).await,
        Command::RetryAll { queue, state } => admin::retry_all(&clients, out, queue, state).await,
        Command::Purge { queue, state } => admin::purge(&clients, out, queue, state).await,
        Command::Pause { queue } => admin::pause(&clients, out, queue).await,
        Command::Resume { queue } => admin::resume(&clients, out, queue).await,
        Command::MaxDepth { queue, max_depth } => admin::max_depth(&clients, out, queue, max_depth).await,
        Command::Workers { queue } => admin::workers(&clients, out, queue).await,
        Command::Enqueue(args) => jobs::enqueue(&clients, out, args).await,
        Command::Watch { id } => jobs::watch(&clients, out, id).await,
        Command::Health { services } => health::check(&clients, out, services).await,
        Command::Smoke { queue, timeout } => smoke::run(&clients, out, queue, timeout).await,
    }
}
