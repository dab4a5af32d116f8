//! [`MemoryStore`]: snapshots in a map, for tests and runs that need not outlive the process.

use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::Store;
use super::table::Table;
use crate::Error;
use crate::clock::Timestamp;
use crate::snapshot::{self, Lease, RunId, Snapshot, SnapshotId, Transition};

/// Snapshots in memory: each run's latest only ([`latest_only`](Self::latest_only), as
/// pydantic_graph's `SimpleStatePersistence`), or the full history
/// ([`full_history`](Self::full_history), with [`dump_json`](Self::dump_json) and
/// [`load_json`](Self::load_json)).
#[derive(Debug)]
pub struct MemoryStore {
    table: Mutex<Table>,
}

impl MemoryStore {
    /// A store that keeps only the latest snapshot of each run.
    pub fn latest_only() -> Self {
        MemoryStore {
            table: Mutex::new(Table::new(false)),
        }
    }

    /// A store that keeps every snapshot.
    pub fn full_history() -> Self {
        MemoryStore {
            table: Mutex::new(Table::new(true)),
        }
    }

    /// Every snapshot as a JSON array, run by run, in `seq` order.
    pub fn dump_json(&self) -> Result<String, Error> {
        snapshot::to_json(&self.lock().all())
    }

    /// A full-history store holding the snapshots of a [`dump_json`](Self::dump_json).
    pub fn load_json(json: &str) -> Result<Self, Error> {
        let store = MemoryStore::full_history();
        {
            let mut table = store.lock();
            for snapshot in snapshot::from_json(json)? {
                table.put(snapshot);
            }
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated: every change is
        // checked before anything is written.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::full_history()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert(&self, snapshot: &Snapshot) -> Result<bool, Error> {
        self.lock().insert(snapshot)
    }

    async fn transition(&self, id: &SnapshotId, transition: Transition) -> Result<(), Error> {
        self.lock().transition(id, transition).map(|_| ())
    }

    async fn claim(&self, run: Option<&RunId>, lease: Lease) -> Result<Option<Snapshot>, Error> {
        Ok(self.lock().claim(run, &lease))
    }

    async fn expire_leases(&self, now: Timestamp) -> Result<Vec<SnapshotId>, Error> {
        Ok(self.lock().expire(now))
    }

    async fn get(&self, id: &SnapshotId) -> Result<Snapshot, Error> {
        self.lock().get(id).cloned()
    }

    async fn latest(&self, run: &RunId) -> Result<Option<Snapshot>, Error> {
        Ok(self.lock().latest(run).cloned())
    }

    async fn history(&self, run: &RunId) -> Result<Vec<Snapshot>, Error> {
        Ok(self.lock().history(run))
    }
}
