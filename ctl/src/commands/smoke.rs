//! `smoke`: proves a broker works end to end (enqueue, dispatch on a Lease stream, fenced completion, read back),
//! for `helm test` and after a deploy. Each step is bounded by one overall deadline and named when it times out.
//!
//! It acts as a worker of capacity 1 on its own queue: assignments of other jobs there (left by an earlier,
//! interrupted run) are released unrun, and it drains (capacity 0) before completing its own so that it takes no
//! other job it would then abandon. On failure the smoke job is cancelled so it does not linger.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use jobbroker::v1::{
    CancelJobRequest, CompleteRequest, EnqueueRequest, GetJobRequest, JobSpec, JobState, LeaseRequest, Register,
    Release, SetCapacity, Success, complete_request::Outcome, lease_request, lease_response,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    connect::Clients,
    error::Error,
    render::{self, Output},
};

const KIND: &str = "jobbroker.smoke";
const PAYLOAD: &[u8] = b"jobctl smoke test";
const RESULT: &[u8] = b"ok";
/// The highest priority the broker accepts: the smoke job goes ahead of anything else on its queue.
const PRIORITY: i32 = 1000;

pub async fn run(clients: &Clients, out: Output, queue: String, timeout: Duration) -> Result<(), Error> {
    let started = Instant::now();
    let smoke = Smoke { clients, out, queue, deadline: tokio::time::Instant::now() + timeout, timeout };
    let id = smoke.enqueue().await?;
    let outcome = async {
        let lease_id = smoke.lease_and_complete(&id).await?;
        smoke.check(&id).await?;
        Ok(lease_id)
    };
    let lease_id = match outcome.await {
        Ok(lease_id) => lease_id,
        Err(error) => {
            let mut broker = clients.broker();
            // Best effort: the failure at hand is what to report.
            let _ = tokio::time::timeout(Duration::from_secs(5), broker.cancel_job(CancelJobRequest { id })).await;
            return Err(error);
        }
    };
    let elapsed = render::duration_text(Duration::from_millis(started.elapsed().as_millis() as u64));
    let json = json!({"passed": true, "queue": smoke.queue, "job_id": id, "lease_id": lease_id, "elapsed": elapsed});
    out.show(json, || format!("smoke test passed in {elapsed}\n"));
    Ok(())
}

struct Smoke<'a> {
    clients: &'a Clients,
    out: Output,
    queue: String,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Smoke<'_> {
    async fn enqueue(&self) -> Result<String, Error> {
        let spec = JobSpec { priority: PRIORITY, ..JobSpec::new(&self.queue, KIND, PAYLOAD) };
        let mut broker = self.clients.broker();
        let enqueue = async move { Ok(broker.enqueue(EnqueueRequest { jobs: vec![spec] }).await?.into_inner()) };
        let answer = self.within("the enqueue", enqueue).await?;
        let job = answer.jobs.into_iter().next().ok_or_else(|| Error::Failed("the broker returned no job".into()))?;
        self.say(format!("enqueued job {} on {}", job.id, self.queue));
        Ok(job.id)
    }

    /// Registers a capacity-1 stream on the queue, waits for the job's assignment and completes it with success.
    /// Returns the lease id.
    async fn lease_and_complete(&self, id: &str) -> Result<String, Error> {
        let mut broker = self.clients.broker();
        // Kept until we return: dropping it closes the stream.
        let (requests, stream) = mpsc::channel(1);
        let register = Register {
            worker_id: format!("jobctl-smoke@{}", jobbroker::worker::default_worker_id()),
            queues: vec![self.queue.clone()],
            capacity: 1,
            ..Register::default()
        };
        let register = LeaseRequest { request: Some(lease_request::Request::Register(register)) };
        requests.send(register).await.map_err(|_| Error::Failed("the Lease stream closed at once".into()))?;
        let open = broker.lease(ReceiverStream::new(stream));
        let mut assignments = self.within("the Lease stream to open", async { Ok(open.await?.into_inner()) }).await?;
        let lease_id = loop {
            let next = async {
                assignments.message().await?.ok_or_else(|| Error::Failed("the broker closed the Lease stream".into()))
            };
            let message = self.within(&format!("the assignment of job {id}"), next).await?;
            let Some(lease_response::Response::Assignment(assignment)) = message.response else { continue };
            if assignment.job.as_ref().is_some_and(|job| job.id == id) {
                break assignment.lease_id;
            }
            let other = assignment.job.map(|job| job.id).unwrap_or_default();
            let release =
                CompleteRequest { lease_id: assignment.lease_id, outcome: Some(Outcome::Release(Release {})) };
            let release = broker.complete(release);
            self.within(&format!("the release of job {other}"), async { Ok(release.await?) }).await?;
            self.say(format!("released job {other}, left on {} by an earlier run", self.queue));
        };
        self.say(format!("leased job {id} (lease {lease_id})"));
        // Drain before completing, so the slot our job frees is not filled with another job just before we close
        // the stream. The stream applies it long before the completion's commit.
        let drain = LeaseRequest { request: Some(lease_request::Request::Capacity(SetCapacity { capacity: 0 })) };
        requests.send(drain).await.map_err(|_| Error::Failed("the Lease stream closed".into()))?;
        let success = Outcome::Success(Success { result: RESULT.to_vec() });
        let complete = broker.complete(CompleteRequest { lease_id: lease_id.clone(), outcome: Some(success) });
        let state = self.within("the completion", async { Ok(complete.await?.into_inner().state) }).await?;
        self.say(format!("completed job {id}: {}", render::state_name(state)));
        drop(requests);
        Ok(lease_id)
    }

    /// Reads the job back: it must be SUCCEEDED with our result.
    async fn check(&self, id: &str) -> Result<(), Error> {
        let mut broker = self.clients.broker();
        let get = async move { Ok(broker.get_job(GetJobRequest { id: id.to_owned() }).await?.into_inner().job) };
        let job = self.within("reading the job back", get).await?;
        let job = job.ok_or_else(|| Error::Failed(format!("GetJob returned no job for {id}")))?;
        if job.state != i32::from(JobState::Succeeded) || job.result != RESULT {
            return Err(Error::Failed(format!(
                "job {id} reads back {} with result {:?}, expected SUCCEEDED with {:?}",
                render::state_name(job.state),
                String::from_utf8_lossy(&job.result),
                String::from_utf8_lossy(RESULT)
            )));
        }
        self.say(format!("read job {id} back: SUCCEEDED"));
        Ok(())
    }

    /// `step`, or a failure naming `what` it was waiting for once the deadline passes.
    async fn within<T>(&self, what: &str, step: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::time::timeout_at(self.deadline, step).await.map_err(|_| {
            let timeout = humantime::format_duration(self.timeout);
            Error::Failed(format!("smoke test timed out after {timeout} waiting for {what}"))
        })?
    }

    /// Progress for people; JSON mode prints only the final summary.
    fn say(&self, line: String) {
        if !self.out.json {
            println!("{line}");
        }
    }
}
