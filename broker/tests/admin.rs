//! AdminService against a real broker (SPEC: Admin, Retry (admin) row): queue stats, paging, admin retry one and
//! in bulk, purge, pause and resume (across replicas), bounded queues, and the connected workers list. Pages of
//! large jobs stop early enough for a default client to read them.

mod common;

use std::{collections::HashSet, time::Duration};

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1::{self as pb, admin_service_client::AdminServiceClient};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(5);

async fn admin(broker: &TestBroker) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(broker.channel().await)
}

async fn stats(admin: &mut AdminServiceClient<Channel>, queue: &str) -> pb::QueueStats {
    let request = pb::GetQueueStatsRequest { queue: queue.into() };
    admin.get_queue_stats(request).await.expect("queue stats").into_inner().stats.expect("stats")
}

fn field_of(status: &tonic::Status) -> String {
    let bad = status.get_details_bad_request().expect("BadRequest details");
    bad.field_violations[0].field.clone()
}

/// Leases and fails `n` jobs of `queue` for good, through a worker of its own.
async fn fail_jobs(broker: &TestBroker, queue: &str, n: usize) -> Vec<String> {
    let mut client = broker.client().await;
    let ids = enqueue(&mut client, (0..n).map(|i| pb::JobSpec::new(queue, "k", vec![i as u8])).collect()).await;
    let mut worker = TestWorker::connect(client, "failer", &[queue], n as u32).await;
    for _ in 0..n {
        let lease = worker.assignment(WAIT).await.lease_id;
        let state = worker.complete(&lease, failure("broken", true, None)).await.expect("complete");
        assert_eq!(state, pb::JobState::Failed);
    }
    ids
}

#[tokio::test]
async fn queue_stats_count_every_state_and_list_queues_names_them() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let (mut client, mut admin) = (broker.client().await, admin(&broker).await);
    let mut later = pb::JobSpec::new("stats", "k", b"later".to_vec());
    later.run_at = Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 });
    let specs = vec![
        pb::JobSpec::new("stats", "k", b"a".to_vec()),
        pb::JobSpec::new("stats", "k", b"b".to_vec()),
        pb::JobSpec::new("stats", "k", b"c".to_vec()),
        pb::JobSpec::new("stats", "k", b"d".to_vec()),
        later,
    ];
    let ids = enqueue(&mut client, specs).await;
    let mut worker = TestWorker::connect(client.clone(), "w", &["stats"], 3).await;
    let leases: Vec<String> =
        [worker.assignment(WAIT).await, worker.assignment(WAIT).await, worker.assignment(WAIT).await]
            .into_iter()
            .map(|a| a.lease_id)
            .collect();
    worker.set_capacity(0).await;
    worker.succeed(&leases[0], b"ok").await.expect("succeed");
    worker.complete(&leases[1], failure("no", true, None)).await.expect("fail");
    // The fourth job stays QUEUED: cancel it through the broker API; the third stays LEASED.
    let queued = wait_for("one job still queued", WAIT, || {
        let mut client = client.clone();
        let ids = ids.clone();
        async move {
            for id in &ids[..4] {
                if get_job(&mut client, id).await.state() == pb::JobState::Queued {
                    return Some(id.clone());
                }
            }
            None
        }
    })
    .await;
    client.cancel_job(pb::CancelJobRequest { id: queued }).await.expect("cancel");

    let counted = stats(&mut admin, "stats").await;
    assert_eq!(
        (counted.queued, counted.scheduled, counted.leased, counted.succeeded, counted.failed, counted.cancelled),
        (0, 1, 1, 1, 1, 1),
        "{counted:?}"
    );
    assert!(!counted.paused);
    assert_eq!(counted.max_depth, 0);

    enqueue(&mut client, vec![pb::JobSpec::new("stats", "k", b"e".to_vec())]).await;
    let waiting = wait_for("the new job to wait a little", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let s = stats(&mut admin, "stats").await;
            (s.oldest_queued_age.as_ref().is_some_and(|age| age.nanos > 0 || age.seconds > 0)).then_some(s)
        }
    })
    .await;
    assert_eq!(waiting.queued, 1);

    enqueue(&mut client, vec![pb::JobSpec::new("another", "k", b"x".to_vec())]).await;
    let listed = admin.list_queues(pb::ListQueuesRequest::default()).await.expect("list queues").into_inner().queues;
    let names: Vec<&str> = listed.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, ["another", "stats"], "sorted by name");
    assert_eq!(listed[0].queued, 1);

    // Paged: one queue per page, each page continuing after the previous one's last name.
    enqueue(&mut client, vec![pb::JobSpec::new("third", "k", b"x".to_vec())]).await;
    let (mut pages, mut page_token) = (Vec::new(), String::new());
    loop {
        let request = pb::ListQueuesRequest { page_size: 1, page_token };
        let page = admin.list_queues(request).await.expect("a page of queues").into_inner();
        pages.push(page.queues.iter().map(|q| q.queue.clone()).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, [["another"], ["stats"], ["third"]]);
    let too_big = admin.list_queues(pb::ListQueuesRequest { page_size: 1001, ..Default::default() }).await;
    assert_eq!(field_of(&too_big.unwrap_err()), "page_size");
    let bad_token = pb::ListQueuesRequest { page_token: "not a queue".into(), ..Default::default() };
    assert_eq!(field_of(&admin.list_queues(bad_token).await.unwrap_err()), "page_token");

    let unknown = stats(&mut admin, "never-used").await;
    assert_eq!((unknown.queue.as_str(), unknown.queued, unknown.failed), ("never-used", 0, 0));
    let bad = admin.get_queue_stats(pb::GetQueueStatsRequest { queue: "no spaces".into() }).await.unwrap_err();
    assert_eq!((bad.code(), field_of(&bad).as_str()), (Code::InvalidArgument, "queue"));
}

#[tokio::test]
async fn list_jobs_pages_newest_first_and_filters_by_state() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let (mut client, mut admin) = (broker.client().await, admin(&broker).await);
    let mut ids = Vec::new();
    for i in 0..7u8 {
        ids.extend(enqueue(&mut client, vec![pb::JobSpec::new("paged", "k", vec![i])]).await);
    }
    let failed = fail_jobs(&broker, "paged-failed", 2).await;

    let (pages, seen) = jobs_in_pages(&admin, "paged", 3).await;
    ids.reverse();
    assert_eq!(seen.into_iter().map(|(id, _)| id).collect::<Vec<_>>(), ids, "every job once, newest first");
    assert_eq!(pages.len(), 3, "pages of 3, 3 and 1");

    let only_failed =
        pb::ListJobsRequest { queue: "paged-failed".into(), state: pb::JobState::Failed.into(), ..Default::default() };
    let page = admin.list_jobs(only_failed).await.expect("list failed").into_inner();
    let mut listed: Vec<String> = page.jobs.iter().map(|j| j.id.clone()).collect();
    listed.sort();
    let mut expected = failed.clone();
    expected.sort();
    assert_eq!(listed, expected);
    assert!(page.jobs.iter().all(|j| j.state() == pb::JobState::Failed && j.last_error == "broken"));
    let none_queued =
        pb::ListJobsRequest { queue: "paged-failed".into(), state: pb::JobState::Queued.into(), ..Default::default() };
    assert!(admin.list_jobs(none_queued).await.expect("list queued").into_inner().jobs.is_empty());

    let bad_token = pb::ListJobsRequest { queue: "paged".into(), page_token: "nope".into(), ..Default::default() };
    let status = admin.list_jobs(bad_token).await.unwrap_err();
    assert_eq!((status.code(), field_of(&status).as_str()), (Code::InvalidArgument, "page_token"));
    let too_big = pb::ListJobsRequest { queue: "paged".into(), page_size: 5000, ..Default::default() };
    let status = admin.list_jobs(too_big).await.unwrap_err();
    assert_eq!(field_of(&status), "page_size");
}

#[tokio::test]
async fn a_page_of_large_jobs_stops_early_so_a_default_client_can_read_it() {
    let settings = Settings::with_database(test_database().await);
    let broker = TestBroker::start(settings.clone()).await;
    let (mut client, admin) = (broker.client().await, admin(&broker).await);
    const LARGE: usize = 900_000;
    // One finished job whose result counts as much as its payload, then six queued ones.
    let mut ids = enqueue(&mut client, vec![pb::JobSpec::new("heavy", "k", vec![0; LARGE])]).await;
    let mut worker = TestWorker::connect(client.clone(), "heavy-lifter", &["heavy"], 1).await;
    let lease = worker.assignment(WAIT).await.lease_id;
    worker.set_capacity(0).await;
    assert_eq!(worker.succeed(&lease, &vec![1; LARGE]).await.expect("complete"), pb::JobState::Succeeded);
    for i in 1..7u8 {
        ids.extend(enqueue(&mut client, vec![pb::JobSpec::new("heavy", "k", vec![i; LARGE])]).await);
    }

    // `admin` decodes at most 4 MiB per message, as gRPC clients do by default; the jobs weigh 7.2 MB in all.
    let (sizes, seen) = jobs_in_pages(&admin, "heavy", 100).await;
    println!("pages of {sizes:?} bytes");
    assert!(sizes.len() > 1, "7.2 MB of jobs cannot come in one page of 4 MB");
    assert!(sizes.iter().all(|&size| size <= settings.limits.max_page_bytes), "{sizes:?}");
    ids.reverse();
    assert_eq!(seen.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), ids, "every job once, newest first");
    assert_eq!(seen.last().map(|(_, state)| *state), Some(pb::JobState::Succeeded));
    drop(worker);
    broker.stop().await;
}

/// Follows a listing to its end: `page(token)` fetches one page and answers its encoded size, its items and the
/// next token. Answers every page's size and every item, in order.
async fn all_pages<T, F, Fut>(mut page: F) -> (Vec<usize>, Vec<T>)
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = (usize, Vec<T>, String)>,
{
    let (mut sizes, mut items, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let (size, more, next) = page(token.clone()).await;
        assert!(!more.is_empty() || (token.is_empty() && next.is_empty()), "only an empty listing has an empty page");
        sizes.push(size);
        items.extend(more);
        if next.is_empty() {
            return (sizes, items);
        }
        token = next;
    }
}

/// Every job of `queue` (id and state), newest first, `page_size` at most per page, and each page's size.
async fn jobs_in_pages(
    admin: &AdminServiceClient<Channel>,
    queue: &str,
    page_size: u32,
) -> (Vec<usize>, Vec<(String, pb::JobState)>) {
    all_pages(|page_token| {
        let mut admin = admin.clone();
        let request = pb::ListJobsRequest { queue: queue.into(), page_size, page_token, ..Default::default() };
        async move {
            let page = admin.list_jobs(request).await.expect("every page fits the client").into_inner();
            let size = prost::Message::encoded_len(&page);
            (
                size,
                page.jobs.into_iter().map(|job| (job.state(), job.id)).map(|(s, id)| (id, s)).collect(),
                page.next_page_token,
            )
        }
    })
    .await
}

/// Every worker of queue `labelled`, oldest first, `page_size` at most per page, and each page's size.
async fn workers_in_pages(admin: &AdminServiceClient<Channel>, page_size: u32) -> (Vec<usize>, Vec<String>) {
    all_pages(|page_token| {
        let mut admin = admin.clone();
        let request = pb::ListWorkersRequest { queue: "labelled".into(), page_size, page_token };
        async move {
            let page = admin.list_workers(request).await.expect("every page fits the client").into_inner();
            let size = prost::Message::encoded_len(&page);
            (size, page.workers.into_iter().map(|w| w.worker_id).collect(), page.next_page_token)
        }
    })
    .await
}

/// Metadata that Postgres stores compressed (64 entries of 4 000 repeated bytes) but a page carries in full.
fn heavy_labels(tag: &str) -> std::collections::HashMap<String, String> {
    (0..64).map(|i| (format!("{tag}-{i}"), "m".repeat(4000))).collect()
}

#[tokio::test]
async fn pages_are_cut_by_the_size_they_are_sent_at_not_the_size_stored() {
    let settings = Settings::with_database(test_database().await);
    let broker = TestBroker::start(settings.clone()).await;
    let (mut client, admin) = (broker.client().await, admin(&broker).await);
    // 20 jobs of 256 KB metadata each: 5 MB on the wire, a few KB in the table.
    let specs: Vec<_> = (0..20)
        .map(|_| pb::JobSpec { metadata: heavy_labels("meta"), ..pb::JobSpec::new("labelled", "k", b"x".to_vec()) })
        .collect();
    let mut ids = enqueue(&mut client, specs).await;
    let (sizes, seen) = jobs_in_pages(&admin, "labelled", 100).await;
    println!("pages of {sizes:?} bytes");
    assert!(sizes.len() > 1 && sizes.iter().all(|&size| size <= settings.limits.max_page_bytes), "{sizes:?}");
    ids.reverse();
    assert_eq!(seen.into_iter().map(|(id, _)| id).collect::<Vec<_>>(), ids, "every job once, newest first");

    // The same for workers: 20 streams of 256 KB labels each, registered one after the other.
    let mut streams = Vec::new();
    for i in 0..20 {
        let register = pb::Register {
            worker_id: format!("labelled-{i}"),
            queues: vec!["labelled".into()],
            capacity: 0,
            labels: heavy_labels("label"),
            ..Default::default()
        };
        streams.push(TestWorker::register(client.clone(), register).await.expect("register"));
        wait_for("the stream to be listed", WAIT, || async {
            (workers_in_pages(&admin, 0).await.1.len() == i + 1).then_some(())
        })
        .await;
    }
    let expected: Vec<_> = (0..20).map(|i| format!("labelled-{i}")).collect();
    let (sizes, listed) = workers_in_pages(&admin, 0).await;
    println!("worker pages of {sizes:?} bytes");
    assert!(sizes.len() > 1 && sizes.iter().all(|&size| size <= settings.limits.max_page_bytes), "{sizes:?}");
    assert_eq!(listed, expected, "every worker once, oldest first");
    let (sizes, listed) = workers_in_pages(&admin, 3).await;
    assert_eq!((sizes.len(), listed), (7, expected), "pages of 3 workers at most");
    drop(streams);
    broker.stop().await;
}

#[tokio::test]
async fn retry_puts_dead_jobs_back_with_attempts_starting_over() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let (mut client, mut admin) = (broker.client().await, admin(&broker).await);
    let dead = fail_jobs(&broker, "dead", 3).await;

    let retried = admin.retry_job(pb::RetryJobRequest { id: dead[0].clone() }).await.expect("retry").into_inner();
    let job = retried.job.expect("the job");
    assert_eq!((job.state(), job.attempt), (pb::JobState::Queued, 0));
    assert_eq!(job.last_error, "broken", "the last error stays visible");
    let again = admin.retry_job(pb::RetryJobRequest { id: dead[0].clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let unknown = admin.retry_job(pb::RetryJobRequest { id: uuid::Uuid::now_v7().to_string() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let bulk = pb::RetryJobsRequest { queue: "dead".into(), ..Default::default() };
    assert_eq!(admin.retry_jobs(bulk.clone()).await.expect("retry all").into_inner().retried, 2);
    assert_eq!(admin.retry_jobs(bulk).await.expect("retry all again").into_inner().retried, 0);
    let wrong_state = pb::RetryJobsRequest { queue: "dead".into(), state: pb::JobState::Succeeded.into() };
    assert_eq!(field_of(&admin.retry_jobs(wrong_state).await.unwrap_err()), "state");

    // The re-queued jobs are handed out again and can now succeed.
    let mut worker = TestWorker::connect(client.clone(), "second-chance", &["dead"], 3).await;
    for _ in 0..3 {
        let assignment = worker.assignment(WAIT).await;
        assert_eq!(assignment.job.as_ref().expect("job").attempt, 1, "attempts started over");
        worker.succeed(&assignment.lease_id, b"fixed").await.expect("succeed");
    }
    for id in &dead {
        assert_eq!(get_job(&mut client, id).await.state(), pb::JobState::Succeeded);
    }
    let after = stats(&mut admin, "dead").await;
    assert_eq!((after.succeeded, after.failed), (3, 0));
}

#[tokio::test]
async fn purge_deletes_terminal_jobs_only() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let (mut client, mut admin) = (broker.client().await, admin(&broker).await);
    let failed = fail_jobs(&broker, "purged", 2).await;
    let queued = enqueue(&mut client, vec![pb::JobSpec::new("purged", "k", b"stays".to_vec())]).await;
    let cancelled = enqueue(&mut client, vec![pb::JobSpec::new("purged", "k", b"c".to_vec())]).await;
    client.cancel_job(pb::CancelJobRequest { id: cancelled[0].clone() }).await.expect("cancel");

    let only_cancelled = pb::PurgeQueueRequest { queue: "purged".into(), state: pb::JobState::Cancelled.into() };
    assert_eq!(admin.purge_queue(only_cancelled).await.expect("purge").into_inner().purged, 1);
    let all = pb::PurgeQueueRequest { queue: "purged".into(), ..Default::default() };
    assert_eq!(admin.purge_queue(all).await.expect("purge").into_inner().purged, 2);

    for id in failed.iter().chain(&cancelled) {
        let status = client.get_job(pb::GetJobRequest { id: id.clone() }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "purged jobs are gone");
    }
    assert_eq!(get_job(&mut client, &queued[0]).await.state(), pb::JobState::Queued, "live jobs are never purged");
    let not_terminal = pb::PurgeQueueRequest { queue: "purged".into(), state: pb::JobState::Queued.into() };
    assert_eq!(field_of(&admin.purge_queue(not_terminal).await.unwrap_err()), "state");
}

#[tokio::test]
async fn pause_stops_dispatch_on_every_replica_and_resume_restarts_it() {
    let database = test_database().await;
    let replica_a = TestBroker::start(Settings::with_database(database.clone())).await;
    let replica_b = TestBroker::start(Settings::with_database(database)).await;
    let (mut client_a, mut admin_a) = (replica_a.client().await, admin(&replica_a).await);
    let mut worker = TestWorker::connect(replica_b.client().await, "on-b", &["steerable"], 4).await;

    let paused = admin_a.pause_queue(pb::PauseQueueRequest { queue: "steerable".into() }).await.expect("pause");
    assert!(paused.into_inner().stats.expect("stats").paused);
    let id = enqueue(&mut client_a, vec![pb::JobSpec::new("steerable", "k", b"held".to_vec())]).await.remove(0);
    // On the worker's own replica an enqueue would lease the job to the idle worker in its insert: not while paused.
    let mut client_b = replica_b.client().await;
    let local = enqueue(&mut client_b, vec![pb::JobSpec::new("steerable", "k", b"held too".to_vec())]).await.remove(0);
    // Longer than the safety-net poll (1 s): neither the NOTIFY nor the poll hands the jobs out.
    worker.expect_nothing(Duration::from_millis(1500)).await;
    let held = stats(&mut admin_a, "steerable").await;
    assert_eq!((held.queued, held.paused), (2, true), "Enqueue still works while paused");

    let started = std::time::Instant::now();
    admin_a.resume_queue(pb::ResumeQueueRequest { queue: "steerable".into() }).await.expect("resume");
    let mut delivered = HashSet::new();
    for _ in 0..2 {
        delivered.insert(worker.assignment(WAIT).await.job.expect("job").id);
    }
    assert_eq!(delivered, HashSet::from([id, local]));
    assert!(started.elapsed() < Duration::from_millis(900), "resume wakes the other replica's worker at once");
    assert!(!stats(&mut admin_a, "steerable").await.paused);
}

#[tokio::test]
async fn a_bounded_queue_refuses_enqueues_past_its_depth_until_drained() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let (mut client, mut admin) = (broker.client().await, admin(&broker).await);
    let bound = pb::SetQueueMaxDepthRequest { queue: "bounded".into(), max_depth: 3 };
    let set = admin.set_queue_max_depth(bound).await.expect("set max depth").into_inner();
    assert_eq!(set.stats.expect("stats").max_depth, 3);
    let spec = |p: &[u8]| pb::JobSpec::new("bounded", "k", p.to_vec());

    enqueue(&mut client, vec![spec(b"1"), spec(b"2")]).await;
    let over = client.enqueue(pb::EnqueueRequest { jobs: vec![spec(b"3"), spec(b"4")] }).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(over.message().contains("bounded"), "the message names the queue: {}", over.message());
    assert!(over.get_details_retry_info().is_some_and(|r| r.retry_delay.is_some()), "a retry hint");
    assert_eq!(stats(&mut admin, "bounded").await.queued, 2, "the refused batch stored nothing");
    enqueue(&mut client, vec![spec(b"3")]).await;
    let full = client.enqueue(pb::EnqueueRequest { jobs: vec![spec(b"4")] }).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    // Other queues are not affected.
    enqueue(&mut client, vec![pb::JobSpec::new("unbounded", "k", b"x".to_vec())]).await;

    let mut worker = TestWorker::connect(client.clone(), "drainer", &["bounded"], 1).await;
    let lease = worker.assignment(WAIT).await.lease_id;
    worker.succeed(&lease, b"").await.expect("succeed");
    enqueue(&mut client, vec![spec(b"4")]).await;

    let unbound = pb::SetQueueMaxDepthRequest { queue: "bounded".into(), max_depth: 0 };
    admin.set_queue_max_depth(unbound).await.expect("remove the bound");
    enqueue(&mut client, (0..10u8).map(|i| spec(&[i])).collect()).await;
}

#[tokio::test]
async fn a_bound_holds_exactly_when_replicas_enqueue_at_once() {
    const MAX: u64 = 500;
    let database = test_database().await;
    let settings = || Settings { poll_interval: Duration::from_millis(50), ..Settings::with_database(&database) };
    let replica_a = TestBroker::start(settings()).await;
    let mut admin_a = admin(&replica_a).await;
    let bound = pb::SetQueueMaxDepthRequest { queue: "tight".into(), max_depth: MAX };
    admin_a.set_queue_max_depth(bound).await.expect("set max depth");
    let replica_b = TestBroker::start(settings()).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // several bound refreshes on replica B

    // Eight producers per replica, each sending batches of 25 until the queue has been full a few times over.
    let mut producers = tokio::task::JoinSet::new();
    for replica in [&replica_a, &replica_b] {
        for _ in 0..8 {
            let mut client = replica.client().await;
            producers.spawn(async move {
                let mut accepted = 0;
                for _ in 0..10 {
                    let jobs = (0..25).map(|_| pb::JobSpec::new("tight", "k", b"x".to_vec())).collect();
                    match client.enqueue(pb::EnqueueRequest { jobs }).await {
                        Ok(answer) => accepted += answer.into_inner().jobs.len() as u64,
                        Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
                    }
                }
                accepted
            });
        }
    }
    let accepted: u64 = producers.join_all().await.into_iter().sum();
    let queued = stats(&mut admin_a, "tight").await.queued;
    assert_eq!(queued, accepted, "every accepted job is stored, no refused one is");
    assert!(queued <= MAX, "{queued} jobs queued past the bound of {MAX}");
    assert!(queued > MAX - 25, "producers filled the queue to within one batch: {queued}");
}

#[tokio::test]
async fn workers_lists_connected_streams_with_their_leases() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let (mut client, mut admin) = (broker.client().await, admin(&broker).await);
    let register = pb::Register {
        worker_id: "listed".into(),
        queues: vec!["w1".into(), "w2".into()],
        capacity: 2,
        labels: [("zone".to_string(), "eu".to_string())].into(),
        ..Default::default()
    };
    let mut worker = TestWorker::register(client.clone(), register).await.expect("register");
    let _other = TestWorker::connect(client.clone(), "elsewhere", &["w3"], 1).await;
    enqueue(&mut client, vec![pb::JobSpec::new("w1", "k", b"x".to_vec())]).await;
    worker.assignment(WAIT).await;

    let listed = pb::ListWorkersRequest { queue: "w2".into(), ..Default::default() };
    let workers = admin.list_workers(listed.clone()).await.expect("list workers").into_inner().workers;
    assert_eq!(workers.len(), 1, "filtered by queue: {workers:?}");
    let info = &workers[0];
    assert_eq!(info.worker_id, "listed");
    assert_eq!(info.queues, ["w1", "w2"]);
    assert_eq!((info.capacity, info.leases_held), (2, 1));
    assert_eq!(info.labels.get("zone").map(String::as_str), Some("eu"));
    assert!(info.connected_at.is_some() && !info.replica.is_empty());
    let all = admin.list_workers(pb::ListWorkersRequest::default()).await.expect("all").into_inner().workers;
    assert_eq!(all.len(), 2);

    worker.set_capacity(5).await;
    wait_for("the new capacity to show", WAIT, || {
        let (mut admin, listed) = (admin.clone(), listed.clone());
        async move {
            let workers = admin.list_workers(listed).await.ok()?.into_inner().workers;
            (workers.first()?.capacity == 5).then_some(())
        }
    })
    .await;
    drop(worker);
    wait_for("the closed stream to leave the list", WAIT, || {
        let (mut admin, listed) = (admin.clone(), listed.clone());
        async move { admin.list_workers(listed).await.ok()?.into_inner().workers.is_empty().then_some(()) }
    })
    .await;
}
