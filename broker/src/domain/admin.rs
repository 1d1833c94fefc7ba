//! What operators can see and steer: queue stats, job pages, admin retry and purge, pause and resume, queue
//! bounds, and the Lease streams of every replica.
//!
//! Pause is enforced by the claim statement itself (so it holds on every replica at once); this module records it
//! and wakes workers on resume. Queue bounds are cached here for the enqueue path and refreshed in the background.

use std::{
    collections::HashMap,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use uuid::Uuid;

use super::Broker;
use crate::{
    error::{Error, Result},
    model::{Job, JobState, Page, QueueStats, WorkerInfo},
    store::{Bound, Store},
};

/// How often a replica marks its Lease streams as alive in the sessions table.
pub(super) const SESSION_REFRESH: Duration = Duration::from_secs(5);
/// A stream not marked alive for this long belongs to a replica that died; it is hidden and then removed.
pub(super) const SESSION_STALE: Duration = Duration::from_secs(30);
/// Retry hint given to a producer whose queue is full.
const FULL_QUEUE_RETRY: Duration = Duration::from_secs(1);

/// The max depth of every bounded queue, as last read from the database.
#[derive(Default)]
pub struct QueueBounds {
    bounds: RwLock<HashMap<String, u64>>,
    /// Bounds set through this replica so far: a refresh whose read may predate one of them is not applied.
    sets: AtomicU64,
}

impl QueueBounds {
    /// The bound of each of `queues` that has one.
    pub fn of<'a>(&self, queues: impl IntoIterator<Item = &'a str>) -> Vec<(String, u64)> {
        let bounds = self.bounds.read().expect("bounds lock");
        queues.into_iter().filter_map(|q| bounds.get(q).map(|max| (q.to_owned(), *max))).collect()
    }

    /// Records a bound this replica just wrote to the database.
    fn set(&self, queue: &str, max_depth: Option<u64>) {
        let mut bounds = self.bounds.write().expect("bounds lock");
        match max_depth {
            Some(max) => bounds.insert(queue.to_owned(), max),
            None => bounds.remove(queue),
        };
        self.sets.fetch_add(1, Ordering::SeqCst);
    }

    /// Re-reads every bound from the database (bounds set through another replica arrive this way). A bound set
    /// through this replica while the read was under way wins; the next refresh reads it back.
    pub async fn refresh(&self, store: &Store) -> Result<()> {
        let before = self.sets.load(Ordering::SeqCst);
        let read = store.queue_bounds().await?;
        let mut bounds = self.bounds.write().expect("bounds lock");
        if self.sets.load(Ordering::SeqCst) == before {
            *bounds = read.into_iter().collect();
        }
        Ok(())
    }
}

/// QUEUED jobs of the bounded queues an enqueue batch touches, and the jobs its accepted RPCs add to them.
pub struct Depths(HashMap<String, Room>);

struct Room {
    queued: u64,
    added: u64,
    max: u64,
}

impl Depths {
    /// Counts the bounded queues among `queues` (one statement; nothing when none is bounded).
    pub async fn read<'a>(
        store: &Store,
        bounds: &QueueBounds,
        queues: impl IntoIterator<Item = &'a str>,
    ) -> Result<Depths> {
        let bounded = bounds.of(queues);
        if bounded.is_empty() {
            return Ok(Depths(HashMap::new()));
        }
        let names: Vec<(&str, u64)> = bounded.iter().map(|(q, max)| (q.as_str(), *max)).collect();
        let depths: HashMap<String, u64> = store.queued_depths(&names).await?.into_iter().collect();
        let room = |q: &String, max| Room { queued: depths.get(q).copied().unwrap_or(0), added: 0, max };
        Ok(Depths(bounded.into_iter().map(|(q, max)| (q.clone(), room(&q, max))).collect()))
    }

    /// Admits `added` new jobs per queue, all or none: RESOURCE_EXHAUSTED naming the first full queue.
    pub fn admit(&mut self, added: &HashMap<&str, u64>) -> Result<()> {
        for (queue, count) in added {
            if let Some(room) = self.0.get(*queue)
                && room.queued + room.added + count > room.max
            {
                return Err(Error::ResourceExhausted {
                    message: format!(
                        "queue `{queue}` is full: {} jobs queued, at most {} allowed; retry after workers drain it",
                        room.queued + room.added,
                        room.max
                    ),
                    retry_after: Some(FULL_QUEUE_RETRY),
                });
            }
        }
        for (queue, count) in added {
            if let Some(room) = self.0.get_mut(*queue) {
                room.added += count;
            }
        }
        Ok(())
    }

    /// What the insert must re-check under its lock: the bounded queues the admitted RPCs add to.
    pub fn bounds(&self) -> Vec<Bound> {
        self.0
            .iter()
            .filter(|(_, room)| room.added > 0)
            .map(|(queue, room)| Bound { queue: queue.clone(), adds: room.added, max: room.max })
            .collect()
    }
}

impl Broker {
    /// One queue's stats; zeros for a queue nobody used.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        let stats = self.store.queue_stats(Some(queue), None, 1).await?.into_iter().next();
        Ok(stats.unwrap_or_else(|| QueueStats { queue: queue.to_owned(), ..QueueStats::default() }))
    }

    /// A page of the queues that have jobs or settings, by name, continuing after `after`; and whether more follow.
    pub async fn queues(&self, after: Option<&str>, page_size: u32) -> Result<(Vec<QueueStats>, bool)> {
        let mut queues = self.store.queue_stats(None, after, i64::from(page_size) + 1).await?;
        let more = queues.len() > page_size as usize;
        queues.truncate(page_size as usize);
        Ok((queues, more))
    }

    /// A page of `queue`'s jobs, newest first, continuing below `after` (the previous page's last id): at most
    /// `page_size` jobs and, past the first, about `max_bytes` of them.
    pub async fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        after: Option<Uuid>,
        page_size: u32,
        max_bytes: usize,
    ) -> Result<Page<Job>> {
        let (jobs, more) = self.store.list_jobs(queue, state, after, page_size, max_bytes).await?;
        Ok(Page::new(jobs, more, |job| job.id))
    }

    /// FAILED or CANCELLED → QUEUED, attempts starting over.
    pub async fn retry_job(&self, id: Uuid) -> Result<Job> {
        if self.store.retry_finished(Some(id), None, None).await?.is_empty() {
            let job = self.job(id).await?;
            return Err(Error::FailedPrecondition(format!(
                "job {id} is {}; only FAILED or CANCELLED jobs can be retried",
                job.state.as_str().to_uppercase()
            )));
        }
        self.watchers.changed(id);
        self.job(id).await
    }

    /// Every job of `queue` in `state` (FAILED or CANCELLED) → QUEUED. Returns how many.
    pub async fn retry_jobs(&self, queue: &str, state: JobState) -> Result<u64> {
        let ids = self.store.retry_finished(None, Some(queue), Some(state)).await?;
        for id in &ids {
            self.watchers.changed(*id);
        }
        Ok(ids.len() as u64)
    }

    /// Deletes `queue`'s terminal jobs (of one state, or all). Returns how many.
    pub async fn purge(&self, queue: &str, state: Option<JobState>) -> Result<u64> {
        self.store.purge_finished(queue, state).await
    }

    /// Stops (or restarts) handing out `queue`'s jobs on every replica.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<QueueStats> {
        self.store.set_paused(queue, paused).await?;
        if !paused {
            self.dispatcher.wake(Some(&[queue]));
        }
        self.queue_stats(queue).await
    }

    /// Bounds `queue` to `max_depth` QUEUED jobs (`None`: unbounded).
    pub async fn set_max_depth(&self, queue: &str, max_depth: Option<u64>) -> Result<QueueStats> {
        self.store.set_max_depth(queue, max_depth).await?;
        self.bounds.set(queue, max_depth);
        self.queue_stats(queue).await
    }

    /// A page of the Lease streams connected to any live replica, oldest first, continuing after `after` (the
    /// previous page's last session): at most `page_size` streams and, past the first, about `max_bytes` of them.
    pub async fn workers(
        &self,
        queue: Option<&str>,
        after: Option<Uuid>,
        page_size: u32,
        max_bytes: usize,
    ) -> Result<Page<WorkerInfo>> {
        let (workers, more) = self.store.list_workers(queue, SESSION_STALE, after, page_size, max_bytes).await?;
        Ok(Page::new(workers, more, |worker| worker.session_id))
    }
}
