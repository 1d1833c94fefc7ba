//! Enqueue: defaults, idempotency keys, and the group-commit handler that stores many Enqueue RPCs at once.
//!
//! Each RPC stays atomic inside the shared transaction: an RPC whose key conflicts is answered ALREADY_EXISTS
//! and contributes nothing, while the others commit. Input validation happened before (in `api`).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    admin::{Depths, QueueBounds},
    batch::BatchHandler,
    dispatch::Dispatcher,
};
use crate::{
    config::JobDefaults,
    error::{Error, Result},
    metrics::Metrics,
    model::{Enqueued, JobSpec, NewJob, RetryPolicy, SpecRequest},
    store::{Inserted, NewKey, Store},
};

/// How often a batch is replanned when concurrent enqueues keep taking its keys, or its bounded queues' room, first.
const KEY_RACE_ATTEMPTS: usize = 5;

pub struct EnqueueHandler {
    pub store: Store,
    pub defaults: JobDefaults,
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub bounds: Arc<QueueBounds>,
}

/// The stored spec for a request: defaults filled in.
pub fn resolve(request: &SpecRequest, defaults: &JobDefaults) -> JobSpec {
    JobSpec {
        queue: request.queue.clone(),
        kind: request.kind.clone(),
        payload: request.payload.clone(),
        priority: request.priority,
        max_attempts: request.max_attempts.unwrap_or(defaults.max_attempts),
        lease_ttl: request.lease_ttl.unwrap_or(defaults.lease_ttl),
        execution_timeout: request.execution_timeout,
        idempotency_key: request.idempotency_key.clone(),
        retry: RetryPolicy {
            initial: request.initial_backoff.unwrap_or(defaults.initial_backoff),
            max: request.max_backoff.unwrap_or(defaults.max_backoff),
            multiplier: request.multiplier.unwrap_or(defaults.backoff_multiplier),
        },
        metadata: request.metadata.clone(),
    }
}

/// Fingerprint of a spec as sent (unset stays unset), so "same key, same spec" survives default changes.
pub fn spec_hash(request: &SpecRequest) -> Vec<u8> {
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    let millis = |d: Option<std::time::Duration>| d.map_or(-1, |d| d.as_millis() as i128).to_le_bytes();
    field(request.queue.as_bytes());
    field(request.kind.as_bytes());
    field(&request.payload);
    field(&request.priority.to_le_bytes());
    field(&request.run_at.map_or(i64::MIN, |t| t.timestamp_micros()).to_le_bytes());
    field(&request.max_attempts.map_or(-1, i64::from).to_le_bytes());
    field(&millis(request.lease_ttl));
    field(&millis(request.execution_timeout));
    field(request.idempotency_key.as_deref().unwrap_or_default().as_bytes());
    field(&millis(request.initial_backoff));
    field(&millis(request.max_backoff));
    field(&request.multiplier.map_or(-1.0, |m| m).to_le_bytes());
    for (key, value) in &request.metadata {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    hash.finalize().to_vec()
}

/// One RPC's share of a batch.
struct Plan {
    answers: Vec<Enqueued>,
    jobs: Vec<NewJob>,
    keys: Vec<NewKey>,
}

impl EnqueueHandler {
    /// Decides, for one RPC, which jobs are new and which repeat a key; fails it if a key repeats with a new spec
    /// or its new jobs would overfill a bounded queue.
    fn plan(
        &self,
        specs: &[SpecRequest],
        taken: &mut HashMap<(String, String), (Uuid, Vec<u8>)>,
        depths: &mut Depths,
    ) -> Result<Plan> {
        let mut plan = Plan { answers: Vec::new(), jobs: Vec::new(), keys: Vec::new() };
        let mut mine: HashMap<(String, String), (Uuid, Vec<u8>)> = HashMap::new();
        for (index, request) in specs.iter().enumerate() {
            let id = Uuid::now_v7();
            if let Some(key) = &request.idempotency_key {
                let hash = spec_hash(request);
                let pair = (request.queue.clone(), key.clone());
                if let Some((id, held)) = mine.get(&pair).or_else(|| taken.get(&pair)) {
                    if *held != hash {
                        return Err(Error::AlreadyExists(format!(
                            "jobs[{index}].idempotency_key `{key}` is already used in queue `{}` by job {id} \
                             with a different spec",
                            request.queue
                        )));
                    }
                    plan.answers.push(Enqueued { id: *id, created: false });
                    continue;
                }
                mine.insert(pair, (id, hash.clone()));
                plan.keys.push(NewKey { queue: request.queue.clone(), key: key.clone(), job_id: id, spec_hash: hash });
            }
            plan.jobs.push(NewJob {
                id,
                spec: resolve(request, &self.defaults),
                run_at: request.run_at,
                trace: request.trace.clone(),
                lease_to: None,
            });
            plan.answers.push(Enqueued { id, created: true });
        }
        let mut added: HashMap<&str, u64> = HashMap::new();
        for job in &plan.jobs {
            *added.entry(job.spec.queue.as_str()).or_default() += 1;
        }
        depths.admit(&added)?;
        taken.extend(mine);
        Ok(plan)
    }

    async fn try_batch(&self, batch: &[Vec<SpecRequest>]) -> Result<Option<Vec<Result<Vec<Enqueued>>>>> {
        let pairs: Vec<(String, String)> = batch
            .iter()
            .flatten()
            .filter_map(|r| r.idempotency_key.as_ref().map(|k| (r.queue.clone(), k.clone())))
            .collect();
        let mut taken: HashMap<(String, String), (Uuid, Vec<u8>)> = self
            .store
            .lookup_keys(&pairs)
            .await?
            .into_iter()
            .map(|holder| ((holder.queue, holder.key), (holder.job_id, holder.spec_hash)))
            .collect();
        let mut depths =
            Depths::read(&self.store, &self.bounds, batch.iter().flatten().map(|r| r.queue.as_str())).await?;
        let (mut jobs, mut keys, mut answers) = (Vec::new(), Vec::new(), Vec::new());
        for specs in batch {
            answers.push(self.plan(specs, &mut taken, &mut depths).map(|plan| {
                jobs.extend(plan.jobs);
                keys.extend(plan.keys);
                plan.answers
            }));
        }
        if jobs.is_empty() {
            return Ok(Some(answers));
        }
        // Jobs a waiting stream of this replica takes are leased by the insert; the others are announced.
        let handoff = self.dispatcher.reserve_handoff(&mut jobs);
        let queued: BTreeSet<&str> =
            jobs.iter().filter(|j| j.lease_to.is_none()).map(|j| j.spec.queue.as_str()).collect();
        let note = (!queued.is_empty()).then(|| self.dispatcher.enqueued_note(&queued));
        match self.store.insert_jobs(&jobs, &keys, &depths.bounds(), note.as_deref()).await? {
            Inserted::Raced => Ok(None),
            Inserted::Committed(leased) => {
                self.metrics.jobs_enqueued(jobs.iter().map(|j| j.spec.queue.as_str()));
                self.dispatcher.hand_off(handoff, leased).await;
                if !queued.is_empty() {
                    self.dispatcher.wake(Some(&queued.into_iter().collect::<Vec<_>>()));
                }
                Ok(Some(answers))
            }
        }
    }
}

impl BatchHandler for EnqueueHandler {
    type Request = Vec<SpecRequest>;
    type Response = Vec<Enqueued>;

    fn weight(request: &Self::Request) -> usize {
        request.len()
    }

    async fn handle(&self, batch: &[Self::Request]) -> Vec<Result<Self::Response>> {
        for _ in 0..KEY_RACE_ATTEMPTS {
            match self.try_batch(batch).await {
                Ok(Some(answers)) => return answers,
                Ok(None) => continue,
                Err(error) => return vec![Err(error); batch.len()],
            }
        }
        let busy = Error::Unavailable("concurrent enqueues keep taking these keys or this queue's room; retry".into());
        vec![Err(busy); batch.len()]
    }
}
