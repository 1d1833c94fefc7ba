//! `jobbroker.v1.BrokerService`: thin adapters from gRPC to [`Broker`].
//!
//! Each method converts and validates its request (`convert`), calls one domain method and converts the answer.
//! The Lease stream adds one tracked task per stream that forwards the worker's messages to its session and runs
//! the completions the worker sends on the stream, answering each on the stream.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use jobbroker::v1::{self as pb, broker_service_server::BrokerService};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream, wrappers::UnboundedReceiverStream};
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};
use tonic::{Request, Response, Status, Streaming};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::convert;
use crate::{
    config::Limits,
    domain::{
        Broker,
        dispatch::{Session, SessionEvent},
    },
    error::Error,
    model::JobState,
};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct BrokerApi {
    broker: Arc<Broker>,
    limits: Limits,
    tracker: TaskTracker,
}

impl BrokerApi {
    pub fn new(broker: Arc<Broker>, limits: Limits, tracker: TaskTracker) -> BrokerApi {
        BrokerApi { broker, limits, tracker }
    }
}

/// A response stream that cancels `gone` when tonic drops it (the client went away or the call ended).
struct Guarded<S> {
    stream: S,
    _gone: DropGuard,
}

impl<S: Stream + Unpin> Stream for Guarded<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}

/// What the worker is sent for a session event; `None` for `Ended`, which ends the stream.
fn lease_response(event: SessionEvent) -> Option<Result<pb::LeaseResponse, Status>> {
    use pb::lease_response::Response as R;
    let response = match event {
        SessionEvent::Assigned { lease_id, lease_expires_at, heartbeat_interval, job } => {
            R::Assignment(pb::Assignment {
                lease_id: lease_id.to_string(),
                job: Some(convert::job(*job)),
                lease_expires_at: Some(convert::time(lease_expires_at)),
                heartbeat_interval: Some(convert::duration(heartbeat_interval)),
            })
        }
        SessionEvent::Cancel { lease_id, job_id } => {
            R::Cancel(pb::CancelNotice { lease_id: lease_id.to_string(), job_id: job_id.to_string() })
        }
        SessionEvent::Closed(error) => return Some(Err(error.into())),
        SessionEvent::Ended => return None,
    };
    Some(Ok(pb::LeaseResponse { response: Some(response) }))
}

/// The answer to a completion sent on the Lease stream: what the Complete RPC would have answered.
fn complete_answer(lease_id: String, answer: Result<JobState, Error>) -> pb::CompleteAnswer {
    match answer {
        Ok(state) => pb::CompleteAnswer { lease_id, state: convert::state(state).into(), ..Default::default() },
        Err(error) => {
            let status = Status::from(error);
            pb::CompleteAnswer {
                lease_id,
                error_code: status.code() as i32,
                error_message: status.message().to_owned(),
                ..Default::default()
            }
        }
    }
}

/// Forwards the worker's messages to its session until the worker goes away, then closes the session.
/// Completions run concurrently (they meet other streams' in the group commit), at most the stream capacity limit
/// at once; their answers go to `answers`, which is bounded: a worker that sends completions but never reads their
/// answers stops being read itself (HTTP/2 flow control then holds it back) instead of growing the broker's memory.
async fn follow_stream(
    broker: Arc<Broker>,
    session: Arc<Session>,
    mut inbound: Streaming<pb::LeaseRequest>,
    limits: Limits,
    answers: mpsc::Sender<pb::CompleteAnswer>,
    gone: CancellationToken,
) {
    use pb::lease_request::Request as R;
    let (mut reading, mut leaving) = (true, false);
    let mut completing = JoinSet::new();
    let most_completing = limits.max_stream_capacity.max(1) as usize;
    while !(leaving && completing.is_empty()) {
        let message = tokio::select! {
            message = inbound.message(), if reading && completing.len() < most_completing => message,
            Some(answered) = completing.join_next() => {
                // Fails only when the response stream is gone, and so is the worker.
                if let Ok(answer) = answered
                    && answers.send(answer).await.is_err()
                {
                    break;
                }
                continue;
            }
            () = gone.cancelled() => break,
        };
        let protocol_error = match message {
            Ok(Some(pb::LeaseRequest { request: Some(R::Capacity(capacity)) })) => {
                match convert::capacity(&capacity, &limits) {
                    Ok(capacity) => {
                        broker.set_capacity(&session, capacity).await;
                        None
                    }
                    Err(error) => Some(error),
                }
            }
            Ok(Some(pb::LeaseRequest { request: Some(R::Complete(request)) })) => {
                let lease_id = request.lease_id.clone();
                let broker = broker.clone();
                let complete = convert::complete_request(request, &limits);
                completing.spawn(async move {
                    let answer = match complete {
                        Ok((lease, outcome)) => broker.complete(lease, outcome).await,
                        Err(error) => Err(error),
                    };
                    complete_answer(lease_id, answer)
                });
                None
            }
            Ok(Some(pb::LeaseRequest { request: Some(R::Register(_)) })) => {
                Some(Error::invalid("register", "must be sent exactly once, as the first message"))
            }
            Ok(Some(pb::LeaseRequest { request: None })) => Some(Error::invalid("request", "must be set")),
            // The worker closed its sending side. At capacity 0 it can receive nothing more: it is leaving. Otherwise
            // (a grpcurl worker, say) it may still be receiving.
            Ok(None) => {
                reading = false;
                leaving = session.capacity() == 0;
                None
            }
            Err(status) => {
                tracing::debug!(%status, "lease stream broke");
                break;
            }
        };
        if let Some(error) = protocol_error {
            session.fail(error);
        }
    }
    // Completions already under way are applied; only their answers have nowhere to go.
    while completing.join_next().await.is_some() {}
    // A worker that left keeps its leases to their deadlines (it heartbeats and completes them by unary calls);
    // an assignment the transport had already taken still reaches it, then the stream ends with OK.
    broker.close_session(&session, !leaving).await;
    if leaving {
        session.end();
    }
}

#[tonic::async_trait]
impl BrokerService for BrokerApi {
    #[tracing::instrument(skip_all, fields(jobs = request.get_ref().jobs.len(), trace_id))]
    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Result<Response<pb::EnqueueResponse>, Status> {
        let trace = convert::trace_context(request.metadata());
        if let Some(trace) = &trace {
            let span = tracing::Span::current();
            span.record("trace_id", trace.trace_id());
            // With OTLP export on, this span continues the producer's trace; with it off there is no OpenTelemetry
            // layer and nothing to continue (the error says just that).
            span.set_parent(convert::otel_context(trace)).ok();
        }
        let specs = convert::enqueue_request(request.into_inner(), trace, &self.limits)?;
        let enqueued = self.broker.enqueue(specs).await?;
        let jobs = enqueued.into_iter().map(|e| pb::EnqueuedJob { id: e.id.to_string(), created: e.created }).collect();
        Ok(Response::new(pb::EnqueueResponse { jobs }))
    }

    type LeaseStream = ResponseStream<pb::LeaseResponse>;

    #[tracing::instrument(skip_all, fields(worker))]
    async fn lease(
        &self,
        request: Request<Streaming<pb::LeaseRequest>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let mut inbound = request.into_inner();
        let register = match inbound.message().await? {
            Some(pb::LeaseRequest { request: Some(pb::lease_request::Request::Register(register)) }) => register,
            _ => return Err(Error::invalid("register", "the first message must be register").into()),
        };
        let registration = convert::register(register, &self.limits)?;
        tracing::Span::current().record("worker", registration.worker_id.as_str());
        let (session, events) = self.broker.open_session(registration).await?;
        tracing::info!(session = %session.id, "worker stream opened");
        let gone = CancellationToken::new();
        let (answers, answered) = mpsc::channel(self.limits.max_stream_capacity.max(1) as usize);
        // An assignment goes out only if the transport takes it before the stream closes (see `Session`).
        let sender = session.clone();
        let events = UnboundedReceiverStream::new(events)
            .filter(move |event| match event {
                SessionEvent::Assigned { lease_id, .. } => sender.take_assignment(*lease_id),
                _ => true,
            })
            .map_while(lease_response);
        let follow = follow_stream(self.broker.clone(), session, inbound, self.limits.clone(), answers, gone.clone());
        self.tracker.spawn(follow);
        // Answers travel small (a channel allocates room for a block of them at a time, not its whole bound) and
        // become responses on the way out.
        let answered = ReceiverStream::new(answered)
            .map(|answer| Ok(pb::LeaseResponse { response: Some(pb::lease_response::Response::Completed(answer)) }));
        let stream = events.merge(answered);
        Ok(Response::new(Box::pin(Guarded { stream, _gone: gone.drop_guard() })))
    }

    #[tracing::instrument(skip_all, fields(leases = request.get_ref().leases.len()))]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let beats = convert::heartbeat_request(request.into_inner(), &self.limits)?;
        let lease_ids: Vec<_> = beats.iter().map(|b| b.lease_id).collect();
        let answers = self.broker.heartbeat(beats).await?;
        let leases = lease_ids
            .into_iter()
            .zip(answers)
            .map(|(lease_id, answer)| pb::LeaseStatus {
                lease_id: lease_id.to_string(),
                active: answer.is_some_and(|a| a.active),
                lease_expires_at: answer.map(|a| convert::time(a.lease_expires_at)),
                cancel_requested: answer.is_some_and(|a| a.cancel_requested),
            })
            .collect();
        Ok(Response::new(pb::HeartbeatResponse { leases }))
    }

    #[tracing::instrument(skip_all, fields(lease_id = %request.get_ref().lease_id))]
    async fn complete(&self, request: Request<pb::CompleteRequest>) -> Result<Response<pb::CompleteResponse>, Status> {
        let (lease_id, outcome) = convert::complete_request(request.into_inner(), &self.limits)?;
        let state = self.broker.complete(lease_id, outcome).await?;
        Ok(Response::new(pb::CompleteResponse { state: convert::state(state).into() }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().id))]
    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = convert::uuid("id", &request.get_ref().id)?;
        let job = self.broker.job(id).await?;
        Ok(Response::new(pb::GetJobResponse { job: Some(convert::job(job)) }))
    }

    type WatchJobStream = ResponseStream<pb::WatchJobResponse>;

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().id))]
    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = convert::uuid("id", &request.get_ref().id)?;
        let changes = self.broker.watch(id).await?;
        let stream = ReceiverStream::new(changes).map(|change| match change {
            Ok(job) => Ok(pb::WatchJobResponse { job: Some(convert::job(job)) }),
            Err(error) => Err(error.into()),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().id))]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = convert::uuid("id", &request.get_ref().id)?;
        let job = self.broker.cancel(id).await?;
        Ok(Response::new(pb::CancelJobResponse { job: Some(convert::job(job)) }))
    }
}
