//! Dispatch: the Lease streams connected to this replica, and the claims that feed them.
//!
//! Streams that subscribe to the same set of queues form a group; one task per group claims jobs for the free
//! slots of the group's streams with a single statement, then pushes each job down its stream. A claim offers a
//! few slots at first and twice as many after each claim that left due jobs behind, so an idle queue with
//! thousands of waiting streams claims its one new job cheaply while a backlog is claimed in large batches. A
//! claim that saw every due job is not followed by another until something changes. A group is
//! woken by enqueues (in-process, or NOTIFY from another replica), by freed capacity, by a timer for the next
//! scheduled job, and by a slow safety-net poll. Capacity is checked again at delivery, so a stream never holds
//! more unfinished leases than it declared. This module does not decide retries or talk SQL itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use super::watch::Watchers;
use crate::{
    error::{Error, Result},
    metrics::Metrics,
    model::{Job, NewJob, Settle, SettleLease, Slot},
    store::{ENQUEUED_CHANNEL, SETTLED_CHANNEL, SessionRecord, Store},
};

/// NOTIFY payloads are limited to 8000 bytes; past this many, a note wakes every queue (`*`).
const MAX_NOTIFY_PAYLOAD: usize = 7000;

/// Slots a claim offers after one that left no due job behind; doubled after each one that did, up to `max_claim`.
const FIRST_OFFER: usize = 16;

/// What the broker tells one worker stream.
#[derive(Debug)]
pub enum SessionEvent {
    Assigned {
        lease_id: Uuid,
        lease_expires_at: DateTime<Utc>,
        heartbeat_interval: Duration,
        job: Box<Job>,
    },
    Cancel {
        lease_id: Uuid,
        job_id: Uuid,
    },
    /// The broker is closing the stream (shutdown): reconnect elsewhere; leases stay valid.
    Closed(Error),
    /// The session is closed after the worker closed its side: the stream ends without an error.
    Ended,
}

/// A worker's Register message, validated.
#[derive(Debug, Clone)]
pub struct Registration {
    pub worker_id: String,
    pub queues: Vec<String>,
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub held_leases: Vec<Uuid>,
}

/// Timing and sizing the dispatcher needs.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub poll_interval: Duration,
    pub reconnect_grace: Duration,
    pub max_claim: usize,
    /// This replica's name in the sessions table (hostname plus a per-start id).
    pub replica: String,
}

/// One connected Lease stream.
pub struct Session {
    pub id: Uuid,
    pub worker_id: String,
    group: Arc<Group>,
    state: Mutex<SessionState>,
    events: mpsc::UnboundedSender<SessionEvent>,
}

struct SessionState {
    capacity: u32,
    /// Leases delivered on this stream and not known to be finished.
    outstanding: HashSet<Uuid>,
    /// Those of `outstanding` whose assignment waits in the channel, not yet taken by the transport: the worker
    /// cannot have seen them, so a closing stream releases them at once instead of giving them the grace.
    unsent: HashSet<Uuid>,
    /// Slots promised to a claim in flight.
    reserved: u32,
    closed: bool,
}

impl Session {
    /// A slot of this stream, as a claim or an insert leases a job to it.
    fn slot(&self) -> Slot {
        Slot { session_id: self.id, worker_id: self.worker_id.clone() }
    }

    /// Ends the stream with `error` (a protocol violation by the worker).
    pub fn fail(&self, error: Error) {
        let _ = self.events.send(SessionEvent::Closed(error));
    }

    /// The stream's capacity as the worker last set it.
    pub fn capacity(&self) -> u32 {
        self.state.lock().expect("session lock").capacity
    }

    /// Ends the stream (after [`Dispatcher::close`]): what was sent before still goes out.
    pub fn end(&self) {
        let _ = self.events.send(SessionEvent::Ended);
    }

    /// The transport takes the assignment of `lease_id` off the channel to send it. False if the stream closed
    /// first and released the lease: the assignment must not go out.
    pub fn take_assignment(&self, lease_id: Uuid) -> bool {
        self.state.lock().expect("session lock").unsent.remove(&lease_id)
    }
}

/// Streams subscribed to the same queue set, fed by one claim task.
struct Group {
    queues: Arc<[String]>,
    sessions: Mutex<Vec<Arc<Session>>>,
    /// Due jobs may be waiting: set by enqueues, re-queues, timers and new streams; cleared by a claim that saw
    /// every due job. A slot freed while it is clear costs no claim (an idle queue is not polled per completion).
    work: AtomicBool,
    /// The last claim saw every due job: while no wake is pending, an enqueue on this replica may lease its jobs to
    /// the group's free slots in the insert itself (a hand-off), as no older due job is known to be waiting (jobs
    /// committed meanwhile are concurrent with it: the claim they woke may still be running).
    idle: AtomicBool,
    wake: Notify,
    stop: CancellationToken,
    /// Where the next claim starts looking for free slots, so new jobs spread over the streams.
    turn: AtomicUsize,
}

/// Where a lease delivered by this replica is running.
struct LeaseHolder {
    session: Arc<Session>,
    job_id: Uuid,
    /// How often the holder is asked to heartbeat (`lease_ttl / 3`).
    heartbeat_interval: Duration,
    /// When the reaper took the lease away. Its slot stays taken until the worker shows it knows (heartbeat or
    /// Complete answered "not current"), so a stuck worker is not handed the job straight back; but at most one
    /// heartbeat interval, so a worker that forgot the lease does not lose the slot for good.
    lost: Option<Instant>,
}

/// All Lease streams of this replica.
pub struct Dispatcher {
    store: Store,
    settings: DispatchSettings,
    watchers: Arc<Watchers>,
    metrics: Arc<Metrics>,
    groups: Mutex<HashMap<Arc<[String]>, Arc<Group>>>,
    leases: Mutex<HashMap<Uuid, LeaseHolder>>,
    /// Woken after a closed stream's grace, so its leases are re-queued without waiting for the next reap.
    reaper: Arc<Notify>,
    /// See [`Self::reaping`].
    reaping: tokio::sync::Mutex<()>,
    /// Set at shutdown: no new streams, no more claims.
    closing: AtomicBool,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        settings: DispatchSettings,
        watchers: Arc<Watchers>,
        metrics: Arc<Metrics>,
        reaper: Arc<Notify>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Dispatcher {
        Dispatcher {
            store,
            settings,
            watchers,
            metrics,
            groups: Mutex::default(),
            leases: Mutex::default(),
            reaper,
            reaping: tokio::sync::Mutex::new(()),
            closing: AtomicBool::new(false),
            tracker,
            shutdown,
        }
    }

    /// Opens a session for a registered worker. Leases it still holds from an earlier stream are adopted and
    /// count against its capacity.
    pub async fn open(
        self: &Arc<Self>,
        registration: Registration,
    ) -> Result<(Arc<Session>, mpsc::UnboundedReceiver<SessionEvent>)> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("the broker is shutting down; connect to another replica".into()));
        }
        let id = Uuid::now_v7();
        let adopted = if registration.held_leases.is_empty() {
            Vec::new()
        } else {
            self.store.adopt_leases(id, &registration.worker_id, &registration.held_leases).await?
        };
        let mut queues = registration.queues;
        queues.sort();
        queues.dedup();
        let record = SessionRecord {
            id,
            replica: &self.settings.replica,
            worker_id: &registration.worker_id,
            queues: &queues,
            capacity: registration.capacity,
            labels: &registration.labels,
        };
        self.store.insert_session(&record).await?;
        let (events, receive) = mpsc::unbounded_channel();
        let mut groups = self.groups.lock().expect("groups lock");
        let group = groups.entry(queues.into()).or_insert_with_key(|queues| self.start_group(queues.clone())).clone();
        let session = Arc::new(Session {
            id,
            worker_id: registration.worker_id,
            group: group.clone(),
            state: Mutex::new(SessionState {
                capacity: registration.capacity,
                outstanding: HashSet::new(),
                unsent: HashSet::new(),
                reserved: 0,
                closed: false,
            }),
            events,
        });
        {
            let mut leases = self.leases.lock().expect("leases lock");
            let mut state = session.state.lock().expect("session lock");
            for (lease_id, job_id, lease_ttl) in adopted {
                let holder =
                    LeaseHolder { session: session.clone(), job_id, heartbeat_interval: lease_ttl / 3, lost: None };
                leases.insert(lease_id, holder);
                state.outstanding.insert(lease_id);
            }
        }
        group.sessions.lock().expect("group lock").push(session.clone());
        drop(groups);
        self.metrics.worker_connected();
        group.work.store(true, Ordering::SeqCst);
        group.wake.notify_one();
        Ok((session, receive))
    }

    fn start_group(self: &Arc<Self>, queues: Arc<[String]>) -> Arc<Group> {
        let group = Arc::new(Group {
            queues,
            sessions: Mutex::default(),
            work: AtomicBool::new(true),
            idle: AtomicBool::new(false),
            wake: Notify::new(),
            stop: self.shutdown.child_token(),
            turn: AtomicUsize::new(0),
        });
        let (dispatcher, task_group) = (self.clone(), group.clone());
        self.tracker.spawn(async move { dispatcher.run_group(task_group).await });
        group
    }

    /// Changes a stream's capacity; more capacity wakes its group.
    pub async fn set_capacity(&self, session: &Session, capacity: u32) {
        session.state.lock().expect("session lock").capacity = capacity;
        session.group.wake.notify_one();
        if let Err(error) = self.store.set_session_capacity(session.id, capacity).await {
            tracing::debug!(%error, session = %session.id, "could not record the new capacity for operators");
        }
    }

    /// Ends a session. Assignments the transport never took are released at once (the worker never saw them).
    /// `abrupt` (the worker went away, not a shutdown) gives the other leases the reconnect grace.
    pub async fn close(&self, session: &Arc<Session>, abrupt: bool) {
        let (outstanding, unsent): (Vec<Uuid>, Vec<Uuid>) = {
            let mut state = session.state.lock().expect("session lock");
            state.closed = true;
            let unsent = std::mem::take(&mut state.unsent);
            state.outstanding.drain().partition(|lease_id| !unsent.contains(lease_id))
        };
        {
            let mut leases = self.leases.lock().expect("leases lock");
            for lease_id in outstanding.iter().chain(&unsent) {
                if leases.get(lease_id).is_some_and(|holder| Arc::ptr_eq(&holder.session, session)) {
                    leases.remove(lease_id);
                }
            }
        }
        {
            let mut groups = self.groups.lock().expect("groups lock");
            let group = &session.group;
            let mut sessions = group.sessions.lock().expect("group lock");
            sessions.retain(|other| !Arc::ptr_eq(other, session));
            if sessions.is_empty() {
                group.stop.cancel();
                groups.remove(&group.queues);
            }
        }
        self.metrics.worker_disconnected();
        if let Err(error) = self.store.delete_session(session.id).await {
            tracing::debug!(%error, session = %session.id, "could not remove the stream from the sessions table");
        }
        if !unsent.is_empty() {
            tracing::info!(session = %session.id, released = unsent.len(), "stream closed before these assignments went out; released");
            self.release(unsent).await;
        }
        // At shutdown the broker closed the stream itself: leases keep their full deadline.
        if !abrupt || outstanding.is_empty() || self.closing.load(Ordering::SeqCst) {
            return;
        }
        let grace = self.settings.reconnect_grace;
        match self.store.shorten_leases(session.id, &outstanding, grace).await {
            Ok(shortened) => {
                tracing::info!(session = %session.id, worker = %session.worker_id, shortened, "stream closed; leases expire after the reconnect grace");
                let (reaper, shutdown) = (self.reaper.clone(), self.shutdown.clone());
                self.tracker.spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(grace) => reaper.notify_one(),
                        () = shutdown.cancelled() => {}
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "could not shorten the leases of a closed stream; they expire at their deadline")
            }
        }
    }

    /// A lease ended (completed, re-queued, lost): free its slot and wake its group.
    /// True if a stream of this replica held it.
    pub fn lease_ended(&self, lease_id: Uuid) -> bool {
        let holder = self.leases.lock().expect("leases lock").remove(&lease_id);
        let Some(holder) = holder else { return false };
        let mut state = holder.session.state.lock().expect("session lock");
        state.outstanding.remove(&lease_id);
        // Not sent yet: it is no use to the worker any more.
        state.unsent.remove(&lease_id);
        drop(state);
        holder.session.group.wake.notify_one();
        true
    }

    /// `leases` were completed here but no stream of this replica held them: tells the other replicas, so the
    /// holder's frees their slots at once rather than at its next reconciliation (which a lost note falls back on).
    pub fn settled_elsewhere(&self, leases: &[Uuid]) {
        let notes = lease_notes(leases);
        self.notify(SETTLED_CHANNEL, notes, "completed leases; their holders free the slots at reconciliation");
    }

    /// Frees the slots of leases another replica completed (a [`SETTLED_CHANNEL`] note).
    pub fn settled_notified(&self, payload: &str) {
        for lease_id in payload.split(',').filter_map(|id| id.parse().ok()) {
            self.lease_ended(lease_id);
        }
    }

    /// Sends `notes` on `channel` in the background; `fallback` says what happens when they are lost.
    fn notify(&self, channel: &'static str, notes: Vec<String>, fallback: &'static str) {
        if notes.is_empty() {
            return;
        }
        let store = self.store.clone();
        self.tracker.spawn(async move {
            if let Err(error) = store.notify(channel, &notes).await {
                tracing::debug!(%error, channel, "could not notify the other replicas of {fallback}");
            }
        });
    }

    /// Held while this replica's reaper takes leases away and marks them lost, and while reconciliation ends the
    /// leases it no longer finds current. Without it, reconciliation could look between the reaper's commit and its
    /// marking, and take a lease reaped here (whose slot stays taken a while) for one completed elsewhere (whose slot
    /// frees at once).
    pub async fn reaping(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reaping.lock().await
    }

    /// The reaper took `lease_id` away: keep its slot taken until the worker learns of it ([`Self::lease_ended`]).
    pub fn lease_lost(&self, lease_id: Uuid) {
        if let Some(holder) = self.leases.lock().expect("leases lock").get_mut(&lease_id) {
            holder.lost = Some(Instant::now());
        }
    }

    /// Tells the stream holding `lease_id`, if it is on this replica, that its job was cancelled.
    pub fn cancel_requested(&self, lease_id: Uuid) {
        let leases = self.leases.lock().expect("leases lock");
        if let Some(holder) = leases.get(&lease_id) {
            let _ = holder.session.events.send(SessionEvent::Cancel { lease_id, job_id: holder.job_id });
        }
    }

    /// The NOTIFY payload announcing jobs committed in `queues` (comma-separated, or `*` for every queue when the
    /// list is too long), tagged with this replica: its own groups were woken in-process, so its listener skips it.
    pub fn enqueued_note(&self, queues: &BTreeSet<&str>) -> String {
        let list = queues.iter().copied().collect::<Vec<_>>().join(",");
        let list = if list.len() > MAX_NOTIFY_PAYLOAD { "*".into() } else { list };
        format!("{} {list}", self.settings.replica)
    }

    /// Jobs of `queues` went back to QUEUED (released, retried, reaped): wakes this replica's groups at once, and
    /// the other replicas' with one NOTIFY, sent in the background (a lost one costs at most a poll interval).
    pub fn requeued(&self, queues: BTreeSet<&str>) {
        if queues.is_empty() {
            return;
        }
        self.wake(Some(&queues.iter().copied().collect::<Vec<_>>()));
        let note = self.enqueued_note(&queues);
        self.notify(ENQUEUED_CHANNEL, vec![note], "re-queued jobs; they find them at their poll");
    }

    /// Wakes the groups named by an enqueue notification, unless this replica sent it.
    pub fn enqueued_elsewhere(&self, payload: &str) {
        let queues = match payload.split_once(' ') {
            Some((replica, _)) if replica == self.settings.replica => return,
            Some((_, queues)) => queues,
            None => payload,
        };
        if queues == "*" {
            self.wake(None);
        } else {
            self.wake(Some(&queues.split(',').collect::<Vec<_>>()));
        }
    }

    /// Wakes every group that takes jobs from one of `queues` (`None`: every group).
    pub fn wake(&self, queues: Option<&[&str]>) {
        let groups = self.groups.lock().expect("groups lock");
        for group in groups.values() {
            if queues.is_none_or(|queues| group.queues.iter().any(|q| queues.contains(&q.as_str()))) {
                group.work.store(true, Ordering::SeqCst);
                group.wake.notify_one();
            }
        }
    }

    /// Every lease this replica delivered that is not known to be finished (or taken away by the reaper).
    pub fn outstanding(&self) -> Vec<Uuid> {
        let leases = self.leases.lock().expect("leases lock");
        leases.iter().filter(|(_, holder)| holder.lost.is_none()).map(|(lease_id, _)| *lease_id).collect()
    }

    /// Frees the slots of leases lost more than a heartbeat interval ago: their workers heard by now, or never will.
    pub fn forget_lost(&self) {
        let forgotten: Vec<Uuid> = {
            let leases = self.leases.lock().expect("leases lock");
            let overdue = |h: &LeaseHolder| h.lost.is_some_and(|lost| lost.elapsed() >= h.heartbeat_interval);
            leases.iter().filter(|(_, holder)| overdue(holder)).map(|(lease_id, _)| *lease_id).collect()
        };
        for lease_id in forgotten {
            self.lease_ended(lease_id);
        }
    }

    /// Shutdown: stop claiming and tell every stream to reconnect elsewhere. Leases keep their deadlines.
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let groups: Vec<Arc<Group>> = self.groups.lock().expect("groups lock").values().cloned().collect();
        for group in groups {
            group.stop.cancel();
            for session in group.sessions.lock().expect("group lock").iter() {
                // A claim still in flight releases what it got instead of sending it down a closing stream.
                session.state.lock().expect("session lock").closed = true;
                let reason = Error::Unavailable("the broker is shutting down; reconnect to another replica".into());
                let _ = session.events.send(SessionEvent::Closed(reason));
            }
        }
    }

    /// Offers the batch's jobs that are due at once to free slots of idle groups of this replica that take their
    /// queue (best priority first, then batch order): each job that gets a slot is marked `lease_to` it, so the
    /// insert leases it. The returned [`Handoff`] holds the slots until [`Self::hand_off`] or its drop.
    pub fn reserve_handoff(&self, jobs: &mut [NewJob]) -> Handoff {
        let mut handoff = Handoff { slots: Reserved(Vec::new()), by_job: HashMap::new() };
        if self.closing.load(Ordering::SeqCst) {
            return handoff;
        }
        let groups: Vec<Arc<Group>> = {
            let groups = self.groups.lock().expect("groups lock");
            groups
                .values()
                .filter(|g| g.idle.load(Ordering::SeqCst) && !g.work.load(Ordering::SeqCst))
                .cloned()
                .collect()
        };
        if groups.is_empty() {
            return handoff;
        }
        let mut due: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].run_at.is_none()).collect();
        due.sort_by_key(|&i| std::cmp::Reverse(jobs[i].spec.priority));
        for group in groups {
            let wanted: Vec<usize> = due
                .iter()
                .copied()
                .filter(|&i| jobs[i].lease_to.is_none() && group.queues.contains(&jobs[i].spec.queue))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let slots = reserve(&group, wanted.len());
            for (k, (i, session)) in wanted.into_iter().zip(slots.iter()).enumerate() {
                jobs[i].lease_to = Some(session.slot());
                handoff.by_job.insert(jobs[i].id, handoff.slots.len() + k);
            }
            handoff.slots.absorb(slots);
        }
        handoff
    }

    /// Pushes the jobs an insert leased down the streams their slots were reserved on, then frees the slots.
    pub async fn hand_off(&self, handoff: Handoff, leased: Vec<Job>) {
        let jobs = leased.into_iter().filter_map(|job| Some((*handoff.by_job.get(&job.id)?, job))).collect();
        // A job whose stream closed meanwhile is released: any group of its queue may take it (its own may be gone).
        self.deliver(&handoff.slots, jobs).await;
    }

    async fn run_group(self: Arc<Self>, group: Arc<Group>) {
        // When to look again without being woken: the safety-net poll, or sooner when a scheduled job comes due.
        let mut deadline = Instant::now();
        let first_offer = FIRST_OFFER.min(self.settings.max_claim);
        let mut offer = first_offer;
        loop {
            tokio::select! {
                () = group.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => {
                    group.work.store(true, Ordering::SeqCst);
                    deadline = Instant::now() + self.settings.poll_interval;
                }
                () = group.stop.cancelled() => return,
            }
            // The flag is taken before looking, so a wake that arrives during a claim is never lost.
            while group.work.swap(false, Ordering::SeqCst) {
                let slots = reserve(&group, offer);
                if slots.is_empty() {
                    group.work.store(true, Ordering::SeqCst);
                    break;
                }
                let offered: Vec<Slot> = slots.iter().map(|session| session.slot()).collect();
                let claimed = self.store.claim(&group.queues, &offered).await;
                let claimed = match claimed {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        group.idle.store(false, Ordering::SeqCst);
                        tracing::warn!(%error, queues = ?group.queues, "claim failed; retrying after the poll interval");
                        break;
                    }
                };
                // Only a claim that left due jobs behind calls for another one (after a slot frees, or at once).
                if claimed.more {
                    group.work.store(true, Ordering::SeqCst);
                    offer = (offer * 2).min(self.settings.max_claim);
                } else {
                    offer = first_offer;
                }
                let released = self.deliver(&slots, claimed.jobs).await;
                drop(slots);
                if released {
                    group.work.store(true, Ordering::SeqCst);
                }
                group.idle.store(!claimed.more && !released, Ordering::SeqCst);
                if !claimed.more {
                    match self.store.next_due(&group.queues).await {
                        Ok(Some(due)) => deadline = deadline.min(Instant::now() + due + Duration::from_millis(1)),
                        Ok(None) => {}
                        Err(error) => tracing::warn!(%error, "cannot read when the next scheduled job is due"),
                    }
                }
            }
        }
    }

    /// Pushes claimed jobs down their streams; a job whose stream closed or shrank meanwhile is released.
    /// True if any was released (so it is due again).
    async fn deliver(&self, slots: &[Arc<Session>], claimed: Vec<(usize, Job)>) -> bool {
        let mut undelivered = Vec::new();
        for (slot, job) in claimed {
            let (Some(lease_id), Some(lease_expires_at)) = (job.lease_id, job.lease_expires_at) else {
                continue;
            };
            self.watchers.changed(job.id);
            // Both instants are the database's: the claim stamped `leased_at`, and `run_at` is when the job was due.
            let waited = job.leased_at.map(|leased_at| (leased_at - job.run_at).to_std().unwrap_or_default());
            let queue = job.spec.queue.clone();
            let session = &slots[slot];
            let heartbeat_interval = job.spec.lease_ttl / 3;
            let holder = LeaseHolder { session: session.clone(), job_id: job.id, heartbeat_interval, lost: None };
            self.leases.lock().expect("leases lock").insert(lease_id, holder);
            let delivered = {
                let mut state = session.state.lock().expect("session lock");
                let fits = !state.closed && (state.outstanding.len() as u32) < state.capacity;
                let event =
                    SessionEvent::Assigned { lease_id, lease_expires_at, heartbeat_interval, job: Box::new(job) };
                let sent = fits && session.events.send(event).is_ok();
                if sent {
                    state.outstanding.insert(lease_id);
                    state.unsent.insert(lease_id);
                }
                sent
            };
            if delivered {
                self.metrics.job_leased(&queue, waited);
            } else {
                self.leases.lock().expect("leases lock").remove(&lease_id);
                undelivered.push(lease_id);
            }
        }
        if undelivered.is_empty() {
            return false;
        }
        self.release(undelivered).await;
        true
    }

    /// Re-queues leases whose assignment never reached their worker (no attempt used), and says so.
    async fn release(&self, lease_ids: Vec<Uuid>) {
        let items: Vec<SettleLease> = lease_ids
            .into_iter()
            .map(|lease_id| SettleLease { lease_id, settle: Settle::Release, only_if_expired: false })
            .collect();
        match self.store.settle(&items).await {
            Ok(settled) => {
                settled.iter().for_each(|done| self.watchers.changed(done.job_id));
                self.requeued(settled.iter().map(|done| done.queue.as_str()).collect());
            }
            Err(error) => {
                tracing::warn!(%error, count = items.len(), "could not release undelivered leases; they expire at their deadline")
            }
        }
    }
}

/// Slots reserved for an enqueue batch's hand-off, and which job each is for; dropping it frees them.
pub struct Handoff {
    slots: Reserved,
    /// Job id → its slot's index in `slots`.
    by_job: HashMap<Uuid, usize>,
}

/// Free slots taken on streams (one entry per slot, a stream once per slot it gives) for a claim or a hand-off
/// until its jobs are delivered: counted as used by every other reservation meanwhile, freed on drop.
struct Reserved(Vec<Arc<Session>>);

impl Reserved {
    /// Takes over `other`'s slots.
    fn absorb(&mut self, mut other: Reserved) {
        self.0.append(&mut other.0);
    }
}

impl std::ops::Deref for Reserved {
    type Target = [Arc<Session>];

    fn deref(&self) -> &[Arc<Session>] {
        &self.0
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        for session in &self.0 {
            session.state.lock().expect("session lock").reserved -= 1;
        }
    }
}

/// Reserves up to `max` free slots across the group's streams, one per stream in turn, so the best jobs spread;
/// each call starts at the next stream.
fn reserve(group: &Group, max: usize) -> Reserved {
    let sessions = group.sessions.lock().expect("group lock");
    let start = group.turn.fetch_add(1, Ordering::Relaxed) % sessions.len().max(1);
    let mut free: Vec<(Arc<Session>, u32)> = sessions[start..]
        .iter()
        .chain(&sessions[..start])
        .filter_map(|session| {
            let state = session.state.lock().expect("session lock");
            let used = state.outstanding.len() as u32 + state.reserved;
            let free = state.capacity.saturating_sub(used);
            (!state.closed && free > 0).then(|| (session.clone(), free))
        })
        .collect();
    let mut slots = Vec::new();
    while slots.len() < max && !free.is_empty() {
        free.retain_mut(|(session, left)| {
            if slots.len() >= max {
                return true;
            }
            slots.push(session.clone());
            *left -= 1;
            *left > 0
        });
    }
    for session in &slots {
        session.state.lock().expect("session lock").reserved += 1;
    }
    Reserved(slots)
}

/// `leases` as [`SETTLED_CHANNEL`] payloads: comma-separated, each within the NOTIFY payload limit.
fn lease_notes(leases: &[Uuid]) -> Vec<String> {
    let mut notes: Vec<String> = Vec::new();
    for lease_id in leases {
        match notes.last_mut() {
            Some(note) if note.len() < MAX_NOTIFY_PAYLOAD => {
                note.push(',');
                note.push_str(&lease_id.to_string());
            }
            _ => notes.push(lease_id.to_string()),
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_notes_carry_every_lease_once_within_the_notify_payload_limit() {
        let leases: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
        let notes = lease_notes(&leases);
        assert!(notes.len() > 1, "1000 lease ids do not fit one payload");
        assert!(notes.iter().all(|note| note.len() < 8000), "Postgres refuses payloads of 8000 bytes or more");
        let carried: Vec<Uuid> = notes.iter().flat_map(|note| note.split(',')).map(|id| id.parse().unwrap()).collect();
        assert_eq!(carried, leases);
        assert!(lease_notes(&[]).is_empty(), "nothing to say, no note");
    }
}
