//! Composition root: builds the store, the domain and the gRPC server, serves until shutdown, then drains.
//!
//! The server's protections are wired here: TLS (and mutual TLS), the [`GateLayer`] (tokens, replica-wide request
//! limit), per-connection stream limit, message sizes, request timeout, keepalive and connection age. The
//! optional health port is plaintext and serves health alone, from the same reporter.
//!
//! Shutdown order (SPEC): health NOT_SERVING, end health `Watch` streams, stop handing out leases and close worker
//! streams (they reconnect elsewhere; their leases stay valid), let in-flight RPCs finish within a bounded grace, stop background work.

use std::{future::Future, io, time::Duration};

use anyhow::Context as _;
use jobbroker::coalesce::Coalesced;
use jobbroker::v1::{admin_service_server::AdminServiceServer, broker_service_server::BrokerServiceServer};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    api::{AdminApi, BrokerApi},
    config::{Settings, Tls},
    connections::Connections,
    domain::Broker,
    gate::GateLayer,
    health, metrics,
    store::Store,
};

/// Longest pause between migration attempts while the database is not reachable.
const MIGRATE_RETRY: Duration = Duration::from_secs(2);

/// The sockets a broker serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    /// Every service: BrokerService, health, reflection.
    pub grpc: TcpListener,
    /// Plaintext, health only (`--health-listen`).
    pub health: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Listeners {
        Listeners { grpc, health: None }
    }
}

/// Serves gRPC on `listeners` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    listeners: impl Into<Listeners>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners { grpc: listener, health: health_listener } = listeners.into();
    let connections = Connections::default();
    let metrics_listener = metrics::bind(&settings.metrics).await?;
    // Checked before anything starts: a bad certificate or key fails the start, not the first handshake.
    let mut builder = Server::builder();
    if let Some(tls) = &settings.security.tls {
        builder = builder.tls_config(tls_config(tls)).context("TLS: --tls-cert and --tls-key are not usable")?;
    }
    let stop = CancellationToken::new();
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();
    {
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = shutdown => stop.cancel(),
                () = stop.cancelled() => {}
            }
        });
    }
    let store = Store::connect_lazy(&settings).context("invalid database URL")?;
    if settings.migrate && !migrate_until_done(&store, &stop).await {
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        return Ok(());
    }
    let broker = Broker::start(store.clone(), settings.clone(), tracker.clone(), background.clone());
    metrics::spawn(metrics_listener, broker.metrics(), store.clone(), &tracker, background.clone());
    let health = health::service(broker.store_health(), stop.clone(), &tracker);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(jobbroker::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Both versions are served, so each lists and describes both (a builder only adds its own).
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let api = BrokerApi::new(broker.clone(), settings.limits.clone(), tracker.clone());
    let service = BrokerServiceServer::new(api)
        .max_decoding_message_size(settings.limits.max_message_bytes)
        .max_encoding_message_size(settings.limits.max_message_bytes);
    let admin = AdminServiceServer::new(AdminApi::new(broker.clone(), &settings.limits))
        .max_decoding_message_size(settings.limits.max_message_bytes)
        .max_encoding_message_size(settings.limits.max_message_bytes);
    let closing = {
        let (stop, broker) = (stop.clone(), broker.clone());
        async move {
            stop.cancelled().await;
            tracing::info!("shutting down: closing worker streams and draining in-flight RPCs");
            broker.close_streams();
        }
    };
    if let Some(listener) = health_listener {
        tracing::info!(address = %listener.local_addr()?, "serving plaintext health checks");
        let health_only = Server::builder()
            .add_service(health.clone())
            .serve_with_incoming_shutdown(connections.accept(incoming(listener)), background.clone().cancelled_owned());
        tracker.spawn(async move {
            if let Err(error) = health_only.await {
                tracing::error!(%error, "the health port failed");
            }
        });
    }
    log_security(&settings);
    tracing::info!(address = %listener.local_addr()?, tls = settings.security.tls.is_some(), "serving gRPC");
    let limits = &settings.serving;
    let server = builder
        .http2_keepalive_interval(Some(settings.keepalive))
        .http2_keepalive_timeout(Some(settings.keepalive))
        .max_concurrent_streams(limits.max_concurrent_streams)
        // After the age, GOAWAY: new calls go to a new connection (maybe another replica). Calls still running
        // (a Lease stream) get one request timeout more, then the connection closes and workers reconnect.
        .max_connection_age(limits.max_connection_age)
        .max_connection_age_grace(limits.request_timeout)
        .timeout(limits.request_timeout)
        .layer(GateLayer::new(settings.security.tokens.clone(), limits.max_concurrent_requests))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(admin)
        .serve_with_incoming_shutdown(connections.accept(incoming(listener)), closing);
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(settings.shutdown_grace).await;
    };
    let served = tokio::select! {
        served = server => served.context("gRPC server failed"),
        () = grace => {
            tracing::warn!(grace = ?settings.shutdown_grace, "in-flight RPCs outlived the shutdown grace; closing anyway");
            Ok(())
        }
    };
    stop.cancel();
    background.cancel();
    // Calls that outlived the grace (a client not reading its stream) hold tasks the tracker waits for.
    connections.cut();
    tracker.close();
    tracker.wait().await;
    store.close().await;
    tracing::info!("stopped");
    served
}

/// Accepted connections of `listener`, their writes [`Coalesced`]. `Server::tcp_nodelay` does not reach sockets
/// from our own listener: without this, Nagle holds a pushed assignment back until the client's delayed ACK
/// (~40 ms).
fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Coalesced<TcpStream>>> {
    TcpIncoming::from(listener).with_nodelay(Some(true)).map(|accepted| accepted.map(Coalesced::new))
}

fn tls_config(tls: &Tls) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    match &tls.client_ca_pem {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

/// Says at start-up how the port is protected; never prints a token.
fn log_security(settings: &Settings) {
    let security = &settings.security;
    if security.tokens.is_empty() {
        tracing::warn!("no tokens configured: authentication is off, anyone who reaches the port may call every RPC");
    } else {
        tracing::info!(tokens = ?security.tokens, "bearer-token authentication on");
    }
    match &security.tls {
        Some(tls) if tls.client_ca_pem.is_some() => tracing::info!("TLS on, client certificates required"),
        Some(_) => tracing::info!("TLS on"),
        None => tracing::info!("TLS off: the gRPC port is plaintext"),
    }
}

/// Applies migrations, retrying while the database is unreachable. False if shutdown came first.
async fn migrate_until_done(store: &Store, stop: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.migrate().await {
            Ok(()) => return true,
            Err(error) => tracing::warn!(%error, "cannot migrate the database yet; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => delay = (delay * 2).min(MIGRATE_RETRY),
            () = stop.cancelled() => return false,
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("termination signal received");
}
