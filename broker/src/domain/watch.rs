//! Who is watching which job on this replica, so a write can wake its watchers at once.
//!
//! A watcher re-reads the job when woken: by a write on this replica (writers call [`Watchers::changed`] for every
//! job they touch; it costs one map lookup when nobody watches), or by the replica's watch poll, which reads what
//! watchers are shown of every watched job in one statement and wakes those whose jobs changed elsewhere.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Default)]
pub struct Watchers {
    watched: Mutex<HashMap<Uuid, (Arc<Notify>, usize)>>,
}

/// Keeps a job watched while alive.
pub struct Watch {
    watchers: Arc<Watchers>,
    job_id: Uuid,
    pub notify: Arc<Notify>,
}

impl Watchers {
    pub fn watch(self: &Arc<Self>, job_id: Uuid) -> Watch {
        let mut watched = self.watched.lock().expect("watchers lock");
        let entry = watched.entry(job_id).or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Watch { watchers: self.clone(), job_id, notify: entry.0.clone() }
    }

    /// Every job watched on this replica.
    pub fn watched(&self) -> Vec<Uuid> {
        self.watched.lock().expect("watchers lock").keys().copied().collect()
    }

    pub fn changed(&self, job_id: Uuid) {
        let watched = self.watched.lock().expect("watchers lock");
        if let Some((notify, _)) = watched.get(&job_id) {
            notify.notify_waiters();
            notify.notify_one();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.watchers.watched.lock().expect("watchers lock");
        if let Some(entry) = watched.get_mut(&self.job_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                watched.remove(&self.job_id);
            }
        }
    }
}
