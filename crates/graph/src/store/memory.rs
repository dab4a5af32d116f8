//! [`MemoryStore`]: snapshots in a map, for tests and runs that need not outlive the process.

use std::sync::{Mutex, MutexGuard};

use super::table::Table;
use super::{Store, StoreFuture};
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

impl Store for MemoryStore {
    fn insert<'a>(&'a self, snapshot: &'a Snapshot) -> StoreFuture<'a, bool> {
        StoreFuture::ready(self.lock().insert(snapshot))
    }

    fn transition<'a>(&'a self, id: &'a SnapshotId, transition: Transition) -> StoreFuture<'a, ()> {
        StoreFuture::ready(self.lock().transition(id, transition).map(|_| ()))
    }

    fn claim<'a>(
        &'a self,
        run: Option<&'a RunId>,
        lease: Lease,
    ) -> StoreFuture<'a, Option<Snapshot>> {
        StoreFuture::ready(Ok(self.lock().claim(run, &lease)))
    }

    fn expire_leases(&self, now: Timestamp) -> StoreFuture<'_, Vec<SnapshotId>> {
        StoreFuture::ready(Ok(self.lock().expire(now)))
    }

    fn get<'a>(&'a self, id: &'a SnapshotId) -> StoreFuture<'a, Snapshot> {
        StoreFuture::ready(self.lock().get(id).cloned())
    }

    fn latest<'a>(&'a self, run: &'a RunId) -> StoreFuture<'a, Option<Snapshot>> {
        StoreFuture::ready(Ok(self.lock().latest(run).cloned()))
    }

    fn history<'a>(&'a self, run: &'a RunId) -> StoreFuture<'a, Vec<Snapshot>> {
        StoreFuture::ready(Ok(self.lock().history(run)))
    }

    fn keeps_values(&self) -> bool {
        true
    }
}
