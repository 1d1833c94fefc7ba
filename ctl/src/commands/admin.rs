//! Queue and worker operations: the AdminService calls that act on a queue or list what is connected.

use jobbroker::v1::{
    GetQueueStatsRequest, JobState, ListJobsRequest, ListQueuesRequest, ListWorkersRequest, PauseQueueRequest,
    PurgeQueueRequest, QueueStats, ResumeQueueRequest, RetryJobsRequest, SetQueueMaxDepthRequest,
};
use serde_json::json;

use crate::{
    cli::{DeadState, JobsArgs, TerminalState},
    connect::Clients,
    error::Error,
    render::{self, Output},
};

/// Every item of a paged listing: `page` fetches the page a token names (empty: the first) and answers its items
/// and the next token (empty on the last page).
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, Error>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Error>>,
{
    let (mut items, mut page_token) = (Vec::new(), String::new());
    loop {
        let (more, next) = page(page_token).await?;
        items.extend(more);
        if next.is_empty() {
            return Ok(items);
        }
        page_token = next;
    }
}

pub async fn queues(clients: &Clients, out: Output) -> Result<(), Error> {
    let queues = all_pages(|page_token| async move {
        let page = clients.admin().list_queues(ListQueuesRequest { page_size: 0, page_token }).await?.into_inner();
        Ok((page.queues, page.next_page_token))
    })
    .await?;
    let json = json!({"queues": queues.iter().map(render::stats_json).collect::<Vec<_>>()});
    out.show(json, || render::stats_table(&queues));
    Ok(())
}

pub async fn stats(clients: &Clients, out: Output, queue: String) -> Result<(), Error> {
    let stats = clients.admin().get_queue_stats(GetQueueStatsRequest { queue }).await?.into_inner().stats;
    show_stats(out, stats)
}

pub async fn jobs(clients: &Clients, out: Output, args: JobsArgs) -> Result<(), Error> {
    let request = ListJobsRequest {
        queue: args.queue.clone(),
        state: args.state.map_or(JobState::Unspecified, JobState::from).into(),
        page_size: args.limit,
        page_token: args.page_token.unwrap_or_default(),
    };
    let page = clients.admin().list_jobs(request).await?.into_inner();
    let json = json!({
        "jobs": page.jobs.iter().map(render::job_json).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
    });
    out.show(json, || render::jobs_table(&page.jobs));
    if !out.json && !page.next_page_token.is_empty() {
        eprintln!("more: jobctl jobs {} --page-token {}", args.queue, page.next_page_token);
    }
    Ok(())
}

pub async fn retry_all(clients: &Clients, out: Output, queue: String, state: DeadState) -> Result<(), Error> {
    let request = RetryJobsRequest { queue: queue.clone(), state: JobState::from(state).into() };
    let retried = clients.admin().retry_jobs(request).await?.into_inner().retried;
    out.show(json!({"queue": queue, "retried": retried}), || format!("retried {} of {queue}\n", count_jobs(retried)));
    Ok(())
}

pub async fn purge(clients: &Clients, out: Output, queue: String, state: Option<TerminalState>) -> Result<(), Error> {
    let state = state.map_or(JobState::Unspecified, JobState::from);
    let request = PurgeQueueRequest { queue: queue.clone(), state: state.into() };
    let purged = clients.admin().purge_queue(request).await?.into_inner().purged;
    out.show(json!({"queue": queue, "purged": purged}), || format!("purged {} of {queue}\n", count_jobs(purged)));
    Ok(())
}

pub async fn pause(clients: &Clients, out: Output, queue: String) -> Result<(), Error> {
    show_stats(out, clients.admin().pause_queue(PauseQueueRequest { queue }).await?.into_inner().stats)
}

pub async fn resume(clients: &Clients, out: Output, queue: String) -> Result<(), Error> {
    show_stats(out, clients.admin().resume_queue(ResumeQueueRequest { queue }).await?.into_inner().stats)
}

pub async fn max_depth(clients: &Clients, out: Output, queue: String, max_depth: u64) -> Result<(), Error> {
    let request = SetQueueMaxDepthRequest { queue, max_depth };
    show_stats(out, clients.admin().set_queue_max_depth(request).await?.into_inner().stats)
}

/// Every connected worker: the broker pages the list, this follows the pages to the end.
pub async fn workers(clients: &Clients, out: Output, queue: Option<String>) -> Result<(), Error> {
    let queue = queue.unwrap_or_default();
    let workers = all_pages(|page_token| {
        let request = ListWorkersRequest { queue: queue.clone(), page_size: 0, page_token };
        async move {
            let page = clients.admin().list_workers(request).await?.into_inner();
            Ok((page.workers, page.next_page_token))
        }
    })
    .await?;
    let json = json!({"workers": workers.iter().map(render::worker_json).collect::<Vec<_>>()});
    out.show(json, || render::workers_table(&workers));
    Ok(())
}

/// `1 job`, `2 jobs`.
fn count_jobs(count: u64) -> String {
    format!("{count} job{}", if count == 1 { "" } else { "s" })
}

fn show_stats(out: Output, stats: Option<QueueStats>) -> Result<(), Error> {
    let stats = stats.ok_or_else(|| Error::Failed("the broker's answer has no queue stats".into()))?;
    out.show(render::stats_json(&stats), || render::stats_table(std::slice::from_ref(&stats)));
    Ok(())
}
