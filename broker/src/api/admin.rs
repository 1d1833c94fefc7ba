//! `jobbroker.v1.AdminService`: thin adapters from gRPC to the operator side of [`Broker`].
//!
//! Each method validates its request (queue names, state filters, paging), calls one domain method and converts
//! the answer. Who may call these is decided before a request gets here (the admin role).

use std::sync::Arc;

use jobbroker::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert;
use crate::{config::Limits, domain::Broker, error::Error, model::JobState};

/// Page size when a listing names none (or less, when `--max-page-size` is lower).
const DEFAULT_PAGE_SIZE: u32 = 50;
const ALL_STATES: &[JobState] =
    &[JobState::Queued, JobState::Leased, JobState::Succeeded, JobState::Failed, JobState::Cancelled];
const DEAD_STATES: &[JobState] = &[JobState::Failed, JobState::Cancelled];
const TERMINAL_STATES: &[JobState] = &[JobState::Succeeded, JobState::Failed, JobState::Cancelled];

pub struct AdminApi {
    broker: Arc<Broker>,
    /// `--max-page-size`.
    max_page_size: u32,
    /// `--max-page-bytes`.
    max_page_bytes: usize,
}

impl AdminApi {
    pub fn new(broker: Arc<Broker>, limits: &Limits) -> AdminApi {
        AdminApi { broker, max_page_size: limits.max_page_size, max_page_bytes: limits.max_page_bytes }
    }

    /// A listing's page size: `default` for 0, at most `--max-page-size`.
    fn page_size(&self, page_size: u32, default: u32) -> Result<u32, Status> {
        match page_size {
            0 => Ok(default.min(self.max_page_size)),
            size if size <= self.max_page_size => Ok(size),
            _ => Err(Error::invalid("page_size", format!("must be at most {}", self.max_page_size)).into()),
        }
    }

    /// A listing's page size (the default for 0) and where it continues (`None` for the first page).
    fn paging(&self, page_size: u32, page_token: &str) -> Result<(u32, Option<Uuid>), Status> {
        let page_size = self.page_size(page_size, DEFAULT_PAGE_SIZE)?;
        let after = match page_token {
            "" => None,
            token => Some(convert::uuid("page_token", token)?),
        };
        Ok((page_size, after))
    }
}

/// The token that continues after `next`; empty on the last page.
fn next_page_token(next: Option<Uuid>) -> String {
    next.map(|id| id.to_string()).unwrap_or_default()
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    #[tracing::instrument(skip_all)]
    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let request = request.into_inner();
        // Queue stats are small: a page holds as many as a page may (all of them, for most brokers).
        let page_size = self.page_size(request.page_size, self.max_page_size)?;
        // The token is the last queue name of the previous page.
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        if let Some(after) = after {
            convert::queue("page_token", after)?;
        }
        let (queues, more) = self.broker.queues(after, page_size).await?;
        let next_page_token =
            if more { queues.last().map(|q| q.queue.clone()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(pb::ListQueuesResponse {
            queues: queues.into_iter().map(convert::queue_stats).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        let queue = &request.get_ref().queue;
        convert::queue("queue", queue)?;
        let stats = self.broker.queue_stats(queue).await?;
        Ok(Response::new(pb::GetQueueStatsResponse { stats: Some(convert::queue_stats(stats)) }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let request = request.into_inner();
        convert::queue("queue", &request.queue)?;
        let state = convert::state_filter("state", request.state, ALL_STATES)?;
        let (page_size, after) = self.paging(request.page_size, &request.page_token)?;
        let page = self.broker.list_jobs(&request.queue, state, after, page_size, self.max_page_bytes).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page.items.into_iter().map(convert::job).collect(),
            next_page_token: next_page_token(page.next),
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().id))]
    async fn retry_job(&self, request: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        let id = convert::uuid("id", &request.get_ref().id)?;
        let job = self.broker.retry_job(id).await?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(convert::job(job)) }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn retry_jobs(
        &self,
        request: Request<pb::RetryJobsRequest>,
    ) -> Result<Response<pb::RetryJobsResponse>, Status> {
        let request = request.into_inner();
        convert::queue("queue", &request.queue)?;
        let state = convert::state_filter("state", request.state, DEAD_STATES)?.unwrap_or(JobState::Failed);
        let retried = self.broker.retry_jobs(&request.queue, state).await?;
        tracing::info!(retried, "dead jobs re-queued");
        Ok(Response::new(pb::RetryJobsResponse { retried }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn purge_queue(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Result<Response<pb::PurgeQueueResponse>, Status> {
        let request = request.into_inner();
        convert::queue("queue", &request.queue)?;
        let state = convert::state_filter("state", request.state, TERMINAL_STATES)?;
        let purged = self.broker.purge(&request.queue, state).await?;
        tracing::info!(purged, "terminal jobs purged");
        Ok(Response::new(pb::PurgeQueueResponse { purged }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let queue = &request.get_ref().queue;
        convert::queue("queue", queue)?;
        let stats = self.broker.set_paused(queue, true).await?;
        tracing::info!("queue paused");
        Ok(Response::new(pb::PauseQueueResponse { stats: Some(convert::queue_stats(stats)) }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let queue = &request.get_ref().queue;
        convert::queue("queue", queue)?;
        let stats = self.broker.set_paused(queue, false).await?;
        tracing::info!("queue resumed");
        Ok(Response::new(pb::ResumeQueueResponse { stats: Some(convert::queue_stats(stats)) }))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue, max_depth = request.get_ref().max_depth))]
    async fn set_queue_max_depth(
        &self,
        request: Request<pb::SetQueueMaxDepthRequest>,
    ) -> Result<Response<pb::SetQueueMaxDepthResponse>, Status> {
        let request = request.into_inner();
        convert::queue("queue", &request.queue)?;
        if request.max_depth > i64::MAX as u64 {
            return Err(Error::invalid("max_depth", "must fit in a signed 64-bit integer").into());
        }
        let max_depth = (request.max_depth != 0).then_some(request.max_depth);
        let stats = self.broker.set_max_depth(&request.queue, max_depth).await?;
        tracing::info!("queue bound changed");
        Ok(Response::new(pb::SetQueueMaxDepthResponse { stats: Some(convert::queue_stats(stats)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let request = request.into_inner();
        let queue = request.queue.as_str();
        if !queue.is_empty() {
            convert::queue("queue", queue)?;
        }
        let (page_size, after) = self.paging(request.page_size, &request.page_token)?;
        let queue = (!queue.is_empty()).then_some(queue);
        let page = self.broker.workers(queue, after, page_size, self.max_page_bytes).await?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: page.items.into_iter().map(convert::worker).collect(),
            next_page_token: next_page_token(page.next),
        }))
    }
}
