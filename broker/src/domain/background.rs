//! Background work of every replica: reaper, retention, cross-replica notifications, lease reconciliation, the
//! watch poll, the database health probe, the sessions table and the queue bounds cache. Each runs as a named task
//! under the broker's tracker until the shutdown token fires.
//!
//! All of it is safe to run on every replica at once: each write is fenced or idempotent.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    admin::{QueueBounds, SESSION_REFRESH, SESSION_STALE},
    dispatch::Dispatcher,
    lease::Leases,
    watch::Watchers,
};
use crate::{
    config::Settings,
    store::{CANCEL_CHANNEL, ENQUEUED_CHANNEL, SETTLED_CHANNEL, Store},
};

/// Most leases one reaper statement handles; it loops while it finds this many.
const REAP_BATCH: u32 = 1000;
/// Pause before re-subscribing after the notification connection was lost.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

/// Waits `period` or until `wake` fires; false once shutdown is requested.
async fn pause(period: Duration, wake: Option<&Notify>, shutdown: &CancellationToken) -> bool {
    let woken = async {
        match wake {
            Some(wake) => wake.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep(period) => true,
        () = woken => true,
        () = shutdown.cancelled() => false,
    }
}

/// Re-queues or fails leases past their deadline (SPEC: deadline passed, execution timeout).
pub async fn reaper(leases: Arc<Leases>, period: Duration, wake: Arc<Notify>, shutdown: CancellationToken) {
    while pause(period, Some(&wake), &shutdown).await {
        loop {
            match leases.reap(REAP_BATCH).await {
                Ok(found) if found as u32 == REAP_BATCH => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "reaper pass failed");
                    break;
                }
            }
        }
    }
}

/// Deletes terminal jobs past the retention period, in bounded batches.
pub async fn retention(store: Store, settings: Settings, shutdown: CancellationToken) {
    while pause(settings.retention_interval, None, &shutdown).await {
        loop {
            match store.delete_finished_before(settings.retention, settings.retention_batch).await {
                Ok(deleted) if deleted > 0 => {
                    tracing::info!(deleted, "retention deleted finished jobs");
                    if deleted < u64::from(settings.retention_batch) || shutdown.is_cancelled() {
                        break;
                    }
                }
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "retention pass failed");
                    break;
                }
            }
        }
    }
}

/// Routes NOTIFYs from every replica: enqueues wake dispatch, cancels reach the holder's stream, completions made
/// elsewhere free the holder's slots.
pub async fn listener(store: Store, dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    loop {
        let mut notifications = match store.listen().await {
            Ok(notifications) => notifications,
            Err(error) => {
                tracing::debug!(%error, "cannot subscribe to notifications yet");
                if !pause(RELISTEN_DELAY, None, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        // Anything may have happened while we were not listening.
        dispatcher.wake(None);
        loop {
            let note = tokio::select! {
                note = notifications.recv() => note,
                () = shutdown.cancelled() => return,
            };
            match note {
                Ok(note) if note.channel == ENQUEUED_CHANNEL => dispatcher.enqueued_elsewhere(&note.payload),
                Ok(note) if note.channel == SETTLED_CHANNEL => dispatcher.settled_notified(&note.payload),
                Ok(note) if note.channel == CANCEL_CHANNEL => match note.payload.parse() {
                    Ok(lease_id) => dispatcher.cancel_requested(lease_id),
                    Err(_) => tracing::warn!(payload = %note.payload, "malformed cancel notification"),
                },
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "notification connection lost; re-subscribing");
                    break;
                }
            }
        }
    }
}

/// Frees the slots of leases settled through another replica (or lost) that this replica never heard of, and of
/// leases lost a heartbeat interval ago whose holders never acknowledged it.
pub async fn reconcile(store: Store, dispatcher: Arc<Dispatcher>, period: Duration, shutdown: CancellationToken) {
    while pause(period, None, &shutdown).await {
        dispatcher.forget_lost();
        let _reaping = dispatcher.reaping().await;
        let outstanding = dispatcher.outstanding();
        if outstanding.is_empty() {
            continue;
        }
        match store.current_leases(&outstanding).await {
            Ok(current) => {
                for lease_id in outstanding.into_iter().filter(|lease| !current.contains(lease)) {
                    dispatcher.lease_ended(lease_id);
                }
            }
            Err(error) => tracing::debug!(%error, "lease reconciliation failed"),
        }
    }
}

/// Every `period`, reads what watchers are shown of every job watched here (one statement) and wakes the watchers
/// of each job that changed since the last read, was not read before, or is gone: changes made through other
/// replicas (this replica's own writes wake watchers at once).
pub async fn watches(store: Store, watchers: Arc<Watchers>, period: Duration, shutdown: CancellationToken) {
    let mut seen: HashMap<Uuid, i64> = HashMap::new();
    while pause(period, None, &shutdown).await {
        let watched = watchers.watched();
        if watched.is_empty() {
            seen.clear();
            continue;
        }
        let marks: HashMap<Uuid, i64> = match store.watch_marks(&watched).await {
            Ok(marks) => marks.into_iter().collect(),
            Err(error) => {
                tracing::debug!(%error, "watch poll failed; trying again");
                continue;
            }
        };
        for job_id in &watched {
            let mark = marks.get(job_id);
            if mark.is_none() || mark != seen.get(job_id) {
                watchers.changed(*job_id);
            }
        }
        seen = marks;
    }
}

/// Probes the database every `period` and publishes whether it answers.
pub async fn health(store: Store, period: Duration, healthy: watch::Sender<bool>, shutdown: CancellationToken) {
    loop {
        let ok = store.ping(period.max(Duration::from_secs(1))).await.is_ok();
        healthy.send_if_modified(|was| {
            if *was != ok {
                if ok {
                    tracing::info!("job store reachable");
                } else {
                    tracing::warn!("job store unreachable");
                }
            }
            std::mem::replace(was, ok) != ok
        });
        if !pause(period, None, &shutdown).await {
            return;
        }
    }
}

/// Marks this replica's Lease streams alive for operators and removes those of replicas that died.
pub async fn sessions(store: Store, replica: String, shutdown: CancellationToken) {
    while pause(SESSION_REFRESH, None, &shutdown).await {
        if let Err(error) = store.refresh_sessions(&replica, SESSION_STALE).await {
            tracing::debug!(%error, "could not refresh the sessions table");
        }
    }
}

/// Keeps the queue bounds the enqueue path checks in step with the database (bounds set on other replicas).
pub async fn bounds(store: Store, bounds: Arc<QueueBounds>, period: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(error) = bounds.refresh(&store).await {
            tracing::debug!(%error, "could not read the queue bounds");
        }
        if !pause(period, None, &shutdown).await {
            return;
        }
    }
}
