//! The life of a lease after delivery: heartbeats, completions and lost leases, each applied in batches.
//!
//! [`Leases`] is shared by the Complete and Heartbeat group-commit handlers and by the reaper, so every path that
//! ends a lease frees the stream's slot, wakes watchers and re-wakes dispatch the same way.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use uuid::Uuid;

use super::{batch::BatchHandler, dispatch::Dispatcher, retry, watch::Watchers};
use crate::{
    error::{Error, Result},
    metrics::{Completion, LostReason, Metrics},
    model::{Beat, BeatAnswer, JobState, Outcome, SettleLease, Settled},
    store::Store,
};

pub struct Leases {
    pub store: Store,
    pub dispatcher: Arc<Dispatcher>,
    pub watchers: Arc<Watchers>,
    pub metrics: Arc<Metrics>,
}

impl Leases {
    /// Applies settles in one statement and tells dispatch and watchers; returns the leases that held.
    /// `reaped`: the leases were taken from their holders, whose slots stay taken until they notice.
    pub async fn settle(&self, items: &[SettleLease], reaped: bool) -> Result<Vec<Settled>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let settled = self.store.settle(items).await?;
        if !reaped {
            let decided: HashMap<Uuid, _> = items.iter().map(|item| (item.lease_id, &item.settle)).collect();
            for done in &settled {
                if let Some(settle) = decided.get(&done.lease_id) {
                    self.metrics.lease_completed(&done.queue, Completion::of(settle, done.state), done.held);
                }
            }
        }
        let mut requeued = BTreeSet::new();
        let mut elsewhere = Vec::new();
        for done in &settled {
            if reaped {
                self.dispatcher.lease_lost(done.lease_id);
            } else if !self.dispatcher.lease_ended(done.lease_id) {
                elsewhere.push(done.lease_id);
            }
            self.watchers.changed(done.job_id);
            if done.state == JobState::Queued {
                requeued.insert(done.queue.as_str());
            }
        }
        self.dispatcher.requeued(requeued);
        self.dispatcher.settled_elsewhere(&elsewhere);
        Ok(settled)
    }

    /// Reaps up to `limit` expired leases; returns how many were found (not how many were still expired).
    pub async fn reap(&self, limit: u32) -> Result<usize> {
        let expired = self.store.expired_leases(limit).await?;
        let items: Vec<SettleLease> = expired
            .iter()
            .map(|facts| SettleLease { lease_id: facts.lease_id, settle: retry::lost(facts), only_if_expired: true })
            .collect();
        let reaping = self.dispatcher.reaping().await;
        let settled = self.settle(&items, true).await?;
        drop(reaping);
        let timed_out: HashMap<Uuid, bool> = expired.iter().map(|facts| (facts.lease_id, facts.timed_out)).collect();
        for done in &settled {
            let reason = match timed_out.get(&done.lease_id) {
                Some(true) => LostReason::ExecutionTimeout,
                _ => LostReason::Expired,
            };
            self.metrics.lease_lost(&done.queue, reason);
        }
        if !settled.is_empty() {
            tracing::info!(count = settled.len(), "re-queued or failed expired leases");
        }
        Ok(expired.len())
    }
}

/// Group commit for Complete: one lease and its outcome per request.
pub struct CompleteHandler(pub Arc<Leases>);

impl BatchHandler for CompleteHandler {
    type Request = (Uuid, Outcome);
    type Response = JobState;

    fn weight(_: &Self::Request) -> usize {
        1
    }

    async fn handle(&self, batch: &[Self::Request]) -> Vec<Result<JobState>> {
        let leases = &self.0;
        let failed: Vec<Uuid> =
            batch.iter().filter(|(_, o)| matches!(o, Outcome::Failure { .. })).map(|(lease, _)| *lease).collect();
        let facts = if failed.is_empty() { Ok(Vec::new()) } else { leases.store.lease_facts(&failed).await };
        let facts: HashMap<Uuid, _> = match facts {
            Ok(facts) => facts.into_iter().map(|f| (f.lease_id, f)).collect(),
            Err(error) => return vec![Err(error); batch.len()],
        };
        let mut seen = std::collections::HashSet::new();
        let mut items = Vec::with_capacity(batch.len());
        for (lease_id, outcome) in batch {
            // A lease named twice in one batch is settled once; the repeat finds it gone (ABORTED).
            if !seen.insert(*lease_id) {
                continue;
            }
            let Some(settle) = retry::settle(facts.get(lease_id), outcome.clone()) else { continue };
            items.push(SettleLease { lease_id: *lease_id, settle, only_if_expired: false });
        }
        let settled: HashMap<Uuid, JobState> = match leases.settle(&items, false).await {
            Ok(done) => done.into_iter().map(|s| (s.lease_id, s.state)).collect(),
            Err(error) => return vec![Err(error); batch.len()],
        };
        let mut answered = std::collections::HashSet::new();
        batch
            .iter()
            .map(|(lease_id, _)| match settled.get(lease_id) {
                Some(state) if answered.insert(*lease_id) => Ok(*state),
                _ => {
                    // The worker now knows its lease is gone: free its slot.
                    leases.dispatcher.lease_ended(*lease_id);
                    Err(Error::LeaseLost(lease_id.to_string()))
                }
            })
            .collect()
    }
}

/// Group commit for Heartbeat: every beat of every concurrent call in one statement.
pub struct HeartbeatHandler(pub Arc<Leases>);

/// A beat's answer: `None` when the lease is not current.
pub type BeatResult = Option<BeatAnswer>;

impl BatchHandler for HeartbeatHandler {
    type Request = Vec<Beat>;
    type Response = Vec<BeatResult>;

    fn weight(request: &Self::Request) -> usize {
        request.len()
    }

    async fn handle(&self, batch: &[Self::Request]) -> Vec<Result<Self::Response>> {
        let leases = &self.0;
        let beats: Vec<Beat> = batch.iter().flatten().cloned().collect();
        let answers = match leases.store.heartbeat(&beats).await {
            Ok(answers) => answers,
            Err(error) => return vec![Err(error); batch.len()],
        };
        let by_lease: HashMap<Uuid, BeatAnswer> = answers.into_iter().map(|a| (a.lease_id, a)).collect();
        for beat in &beats {
            match by_lease.get(&beat.lease_id) {
                Some(answer) if beat.progress.is_some() => leases.watchers.changed(answer.job_id),
                Some(_) => {}
                None => {
                    leases.dispatcher.lease_ended(beat.lease_id);
                }
            }
        }
        batch.iter().map(|beats| Ok(beats.iter().map(|b| by_lease.get(&b.lease_id).copied()).collect())).collect()
    }
}
