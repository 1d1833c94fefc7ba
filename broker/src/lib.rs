//! jobbroker's broker: a Postgres-backed job store and the whole lease lifecycle over gRPC.
//!
//! Data flows one way: [`api`] (tonic adapters) → [`domain`] (leasing, dispatch, retry policy) → [`store`]
//! (all SQL). [`serve`] is what `main` and the tests call; [`run`] adds the command line around it.

pub mod api;
pub mod config;
pub mod devdb;
pub mod domain;
pub mod error;
pub mod model;
mod server;
pub mod store;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::{Cli, Command, DevArgs, Settings};
pub use crate::server::serve;

/// Runs the command line: serve (default), migrate, or dev.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None | Some(Command::Serve) => {
            let settings = cli.serve.validate().map_err(anyhow::Error::msg)?;
            serve_forever(settings).await
        }
        Some(Command::Migrate) => {
            let settings = cli.serve.validate().map_err(anyhow::Error::msg)?;
            store::Store::connect_lazy(&settings)?.migrate().await.context("migration failed")?;
            tracing::info!("database migrated");
            Ok(())
        }
        Some(Command::Dev(dev)) => run_dev(cli.serve, dev).await,
    }
}

async fn serve_forever(settings: Settings) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(settings.listen).await.with_context(|| format!("cannot listen on {}", settings.listen))?;
    serve(listener, settings, server::termination()).await
}

/// Starts a private Postgres in a local data directory, then serves against it.
async fn run_dev(mut serve_args: config::ServeArgs, dev: DevArgs) -> anyhow::Result<()> {
    let options = devdb::PgOptions::default();
    let data_dir = dev.data_dir.unwrap_or_else(|| devdb::scratch_dir("dev-postgres"));
    let port = dev.pg_port;
    let dir = data_dir.clone();
    let postgres = tokio::task::spawn_blocking(move || devdb::LocalPostgres::start(&dir, port, &options))
        .await
        .context("the Postgres launcher panicked")??;
    serve_args.database_url = Some(postgres.url());
    let settings = serve_args.validate().map_err(anyhow::Error::msg)?;
    let address = settings.listen;
    println!(
        "jobbroker dev: Postgres at {} (data in {}); gRPC on {address}\n\
         Try it (grpcurl, or `buf curl --protocol grpc --http2-prior-knowledge`):\n  \
         grpcurl -plaintext -d '{{\"jobs\":[{{\"queue\":\"default\",\"kind\":\"hello\",\"payload\":\"aGk=\"}}]}}' \
         127.0.0.1:{port} jobbroker.v1.BrokerService/Enqueue",
        postgres.url(),
        data_dir.display(),
        port = address.port(),
    );
    let served = serve_forever(settings).await;
    if let Err(error) = tokio::task::spawn_blocking(move || postgres.stop()).await? {
        tracing::warn!(%error, "could not stop the dev Postgres");
    }
    served
}
