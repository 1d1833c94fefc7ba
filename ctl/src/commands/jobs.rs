//! One job at a time: enqueue, get, cancel, retry and watch.

use std::{io::Read as _, path::Path, time::SystemTime};

use jobbroker::v1::{
    CancelJobRequest, EnqueueRequest, GetJobRequest, Job, JobSpec, JobState, RetryJobRequest, WatchJobRequest,
};
use serde_json::json;

use crate::{
    cli::EnqueueArgs,
    connect::Clients,
    error::Error,
    render::{self, Output},
};

pub async fn enqueue(clients: &Clients, out: Output, args: EnqueueArgs) -> Result<(), Error> {
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => read_payload(path)?,
        (None, None) => Vec::new(),
    };
    let spec = JobSpec {
        queue: args.queue.clone(),
        kind: args.kind,
        payload,
        priority: args.priority.unwrap_or_default(),
        run_at: args.delay.map(|delay| (SystemTime::now() + delay).into()),
        max_attempts: args.max_attempts.unwrap_or_default(),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        ..JobSpec::default()
    };
    let answer = clients.broker().enqueue(EnqueueRequest { jobs: vec![spec] }).await?.into_inner();
    let job = answer.jobs.into_iter().next().ok_or_else(|| Error::Failed("the broker returned no job".into()))?;
    out.show(json!({"id": job.id, "created": job.created}), || match job.created {
        true => format!("enqueued job {} on {}\n", job.id, args.queue),
        false => format!("job {} already exists with that idempotency key\n", job.id),
    });
    Ok(())
}

pub async fn get(clients: &Clients, out: Output, id: String) -> Result<(), Error> {
    show_job(out, clients.broker().get_job(GetJobRequest { id }).await?.into_inner().job)
}

pub async fn cancel(clients: &Clients, out: Output, id: String) -> Result<(), Error> {
    show_job(out, clients.broker().cancel_job(CancelJobRequest { id }).await?.into_inner().job)
}

pub async fn retry(clients: &Clients, out: Output, id: String) -> Result<(), Error> {
    show_job(out, clients.admin().retry_job(RetryJobRequest { id }).await?.into_inner().job)
}

/// Prints the job's state now and at every change; succeeds only if it ends SUCCEEDED.
pub async fn watch(clients: &Clients, out: Output, id: String) -> Result<(), Error> {
    let mut stream = clients.broker().watch_job(WatchJobRequest { id: id.clone() }).await?.into_inner();
    let mut last: Option<Job> = None;
    while let Some(update) = stream.message().await? {
        let Some(job) = update.job else { continue };
        out.show(render::job_json(&job), || watch_line(&job));
        last = Some(job);
    }
    let Some(job) = last else {
        return Err(Error::Failed(format!("the broker closed the watch of job {id} without an answer")));
    };
    match JobState::try_from(job.state) {
        Ok(JobState::Succeeded) => Ok(()),
        Ok(JobState::Failed | JobState::Cancelled) => {
            Err(Error::JobEnded { id, state: render::state_name(job.state).into(), last_error: job.last_error })
        }
        _ => Err(Error::Failed(format!("the broker closed the watch of job {id} before it finished"))),
    }
}

/// One line per change: the time it was seen, the state, and what else is known at that point.
fn watch_line(job: &Job) -> String {
    let max_attempts = job.spec.as_ref().map_or(0, |spec| spec.max_attempts);
    let mut cells = vec![
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        render::state_name(job.state).to_owned(),
        format!("attempt {}/{max_attempts}", job.attempt),
    ];
    if !job.worker_id.is_empty() {
        cells.push(format!("worker {}", job.worker_id));
    }
    if let Some(progress) = job.progress.as_ref().filter(|p| p.percent > 0 || !p.message.is_empty()) {
        cells.push(format!("{}% {}", progress.percent, progress.message).trim_end().to_owned());
    }
    if !job.last_error.is_empty() {
        cells.push(format!("error: {}", job.last_error));
    }
    cells.join("  ") + "\n"
}

fn show_job(out: Output, job: Option<Job>) -> Result<(), Error> {
    let job = job.ok_or_else(|| Error::Failed("the broker's answer has no job".into()))?;
    out.show(render::job_json(&job), || render::job_fields(&job));
    Ok(())
}

/// The file's bytes, or stdin's for `-`.
fn read_payload(path: &Path) -> Result<Vec<u8>, Error> {
    let mut payload = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut payload).map(|_| ())
    } else {
        std::fs::read(path).map(|bytes| payload = bytes)
    };
    read.map_err(|e| Error::Input(format!("--payload-file {}: {e}", path.display())))?;
    Ok(payload)
}
