//! `grpc.health.v1`: every service follows the store's reachability and turns NOT_SERVING for good once shutdown
//! begins. Then every `Watch` stream ends (NOT_SERVING, then UNAVAILABLE), so a client watching health (gRPC client-side
//! health checking, a service mesh) neither holds the graceful shutdown open for the whole grace nor keeps
//! watching a replica that is going away. `Check` is tonic-health's own.

use std::pin::Pin;

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

/// The services health reports on, besides the whole server ("").
const SERVICES: [&str; 3] = ["", "jobbroker.v1.BrokerService", "jobbroker.v1.AdminService"];

/// The health service, reporting `reachable` until `stop` is cancelled (a task on `tracker`).
pub fn service(
    reachable: watch::Receiver<bool>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> HealthServer<Closing> {
    let reporter = HealthReporter::new();
    let closed = CancellationToken::new();
    tracker.spawn(report(reporter.clone(), reachable, stop, closed.clone()));
    HealthServer::new(Closing { inner: HealthService::from_health_reporter(reporter), closed })
}

/// Sets every service's status from `reachable`; at `stop`, cancels `closed`, then NOT_SERVING for good: every
/// `Watch` stream sees that last status (a watch channel notifies even an unchanged value) after `closed`.
async fn report(
    reporter: HealthReporter,
    mut reachable: watch::Receiver<bool>,
    stop: CancellationToken,
    closed: CancellationToken,
) {
    loop {
        let status = if *reachable.borrow_and_update() { ServingStatus::Serving } else { ServingStatus::NotServing };
        for service in SERVICES {
            reporter.set_service_status(service, status).await;
        }
        tokio::select! {
            changed = reachable.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    closed.cancel();
    for service in SERVICES {
        reporter.set_service_status(service, ServingStatus::NotServing).await;
    }
}

/// tonic-health's service, with `Watch` streams that end once shutdown has turned health off.
pub struct Closing {
    inner: HealthService,
    closed: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Closing {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let closed = self.closed.clone();
        let not_serving = HealthCheckResponse { status: health_check_response::ServingStatus::NotServing.into() };
        let end = [Ok(not_serving), Err(Status::unavailable("the broker is shutting down; watch another replica"))];
        let statuses = self.inner.watch(request).await?.into_inner();
        let statuses = statuses.take_while(move |_| !closed.is_cancelled()).chain(tokio_stream::iter(end));
        Ok(Response::new(Box::pin(statuses)))
    }
}
