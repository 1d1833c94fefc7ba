//! jobbroker's broker: a Postgres-backed job store and the whole lease lifecycle over gRPC.
//!
//! Data flows one way: [`api`] (tonic adapters) → [`domain`] (leasing, dispatch, retry policy) → [`store`]
//! (all SQL). [`serve`] is what `main` and the tests call; [`run`] adds the command line around it.

/// mimalloc instead of the system allocator, for every binary linking the broker (`broker`, the bench that runs
/// it as a child, the tests): each RPC allocates and frees many small buffers across threads, which cost glibc's
/// allocator about a tenth of the broker's CPU (BENCHMARKS.md). Built without transparent huge pages (`no_thp`):
/// with them a drain's peak RSS was 80–107 MiB instead of 47.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod auth;
pub mod config;
mod connections;
mod dev;
pub mod devdb;
pub mod domain;
pub mod error;
mod gate;
mod health;
pub mod metrics;
pub mod model;
mod server;
pub mod store;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::{Cli, Command, Settings};
pub use crate::server::{Listeners, serve};

/// Runs the command line: serve (default), migrate, or dev.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None | Some(Command::Serve) => {
            let settings = cli.serve.validate().map_err(anyhow::Error::msg)?;
            serve_until(settings, server::termination()).await
        }
        Some(Command::Migrate) => {
            let settings = cli.serve.validate().map_err(anyhow::Error::msg)?;
            store::Store::connect_lazy(&settings)?.migrate().await.context("migration failed")?;
            tracing::info!("database migrated");
            Ok(())
        }
        Some(Command::Dev(args)) => dev::run(cli.serve, args).await,
    }
}

/// Binds the listeners of `settings` and serves until `shutdown` resolves.
async fn serve_until(settings: Settings, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let grpc = bind(settings.listen).await?;
    let health = match settings.health_listen {
        Some(address) => Some(bind(address).await?),
        None => None,
    };
    serve(Listeners { grpc, health }, settings, shutdown).await
}

async fn bind(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))
}
