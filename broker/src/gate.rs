//! The tower layer in front of every gRPC service of the main port: authentication ([`Tokens`]), then admission
//! against the replica-wide `--max-concurrent-requests`.
//!
//! A request over the limit is refused at once with RESOURCE_EXHAUSTED (load shedding: nothing queues). A permit
//! is held until the handler has produced its response, so a streaming RPC (Lease, WatchJob) holds one only while
//! it starts, never for the life of its stream. Health checks need no token and no permit, so probes answer on an
//! overloaded replica. Refusals are logged at debug level with the path, never with the token.
//!
//! One translation: tonic refuses a request message over `--max-message-bytes` with OUT_OF_RANGE, where gRPC's
//! status-code table and our SPEC say RESOURCE_EXHAUSTED (what clients' retry policies expect). The broker itself
//! never answers OUT_OF_RANGE, so the code alone identifies tonic's size limit; the message (naming the limit)
//! is kept.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::{
    Code, Status,
    body::Body,
    codegen::http::{HeaderValue, Request, Response},
};
use tower::{Layer, Service};

use crate::auth::{self, Tokens};

const GRPC_STATUS: &str = "grpc-status";
/// `Code::OutOfRange` as written in a `grpc-status` header.
const OUT_OF_RANGE: &str = "11";

/// Builds [`Gate`]s that share one set of tokens and one pool of request permits.
#[derive(Clone, Debug)]
pub struct GateLayer {
    tokens: Arc<Tokens>,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl GateLayer {
    pub fn new(tokens: Tokens, max_concurrent_requests: usize) -> GateLayer {
        GateLayer {
            tokens: Arc::new(tokens),
            permits: Arc::new(Semaphore::new(max_concurrent_requests)),
            limit: max_concurrent_requests,
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner, layer: self.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Gate<S> {
    inner: S,
    layer: GateLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for Gate<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if let Err(status) = self.layer.tokens.authorize(path, request.headers()) {
            tracing::debug!(path, code = ?status.code(), "request refused by authentication");
            return refuse(status);
        }
        let permit = if auth::is_health(path) {
            None
        } else {
            match self.layer.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracing::debug!(path, limit = self.layer.limit, "request shed: too many in flight");
                    return refuse(Status::resource_exhausted(format!(
                        "the broker is serving its limit of {} concurrent requests (--max-concurrent-requests); \
                         retry with backoff",
                        self.layer.limit
                    )));
                }
            }
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response.map(size_limit_as_resource_exhausted)
        })
    }
}

/// A trailers-only answer (the status in the headers) of OUT_OF_RANGE becomes RESOURCE_EXHAUSTED.
fn size_limit_as_resource_exhausted(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    if headers.get(GRPC_STATUS).is_some_and(|code| code.as_bytes() == OUT_OF_RANGE.as_bytes()) {
        headers.insert(GRPC_STATUS, HeaderValue::from(Code::ResourceExhausted as i32));
    }
    response
}

fn refuse<E: Send + 'static>(status: Status) -> BoxFuture<Result<Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}
