//! Where snapshots live: the [`Store`] trait and its backends.
//!
//! | backend | keeps | for |
//! | --- | --- | --- |
//! | [`MemoryStore`] | the latest snapshot of each run, or every snapshot (JSON dump/load) | tests, runs that need not survive the process |
//! | [`FileStore`] | an append-only, fsync'd log under an OS lock; compaction | one process, no database |
//! | [`SqliteStore`] | SQLite in WAL mode | the embedded default |
//! | [`PostgresStore`] | Postgres | several workers on several machines |
//!
//! Every backend passes the same conformance suite (`tests/conformance.rs`).

use std::time::Duration;

use async_trait::async_trait;

use crate::Error;
use crate::clock::Timestamp;
use crate::snapshot::{Lease, RunId, Snapshot, SnapshotId, Transition};

mod file;
mod memory;
mod table;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod writer;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[macro_use]
mod sql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use file::FileStore;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// Snapshot persistence. Every write is atomic: a transition and the snapshot it inserts are
/// committed together or not at all.
///
/// Reads of an unknown run return nothing; writes to an unknown snapshot are
/// [`Error::NotFound`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts `snapshot` unless a snapshot with its id exists; returns whether it did.
    /// Another snapshot at the same `(run_id, seq)` is an [`Error::Conflict`].
    async fn insert(&self, snapshot: &Snapshot) -> Result<bool, Error>;

    /// Applies `transition` to snapshot `id` (and inserts the snapshot it carries), or fails
    /// with [`Error::IllegalTransition`] or [`Error::Conflict`] and changes nothing.
    async fn transition(&self, id: &SnapshotId, transition: Transition) -> Result<(), Error>;

    /// Claims a `created` snapshot (of `run`, or of any run, oldest first): it becomes `pending`
    /// under `lease`. Of concurrent claimers, exactly one gets each snapshot.
    async fn claim(&self, run: Option<&RunId>, lease: Lease) -> Result<Option<Snapshot>, Error>;

    /// Takes back every `pending` or `running` snapshot whose lease expired before `now`: it
    /// becomes `created` with `attempt + 1`. Returns their ids.
    async fn expire_leases(&self, now: Timestamp) -> Result<Vec<SnapshotId>, Error>;

    /// The snapshot `id`.
    async fn get(&self, id: &SnapshotId) -> Result<Snapshot, Error>;

    /// The run's last snapshot (highest `seq`).
    async fn latest(&self, run: &RunId) -> Result<Option<Snapshot>, Error>;

    /// The run's snapshots in `seq` order.
    async fn history(&self, run: &RunId) -> Result<Vec<Snapshot>, Error>;
}

/// When a durable store's commit is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on disk (fsync'd) before it is acknowledged. Commits already queued
    /// behind one being written share the next sync.
    #[default]
    Immediate,
    /// Commits arriving within `window` of the first are written and synced together, then all
    /// acknowledged: far more commits per second under concurrency, each still durable before
    /// its acknowledgement, at the cost of up to `window` of latency.
    Group {
        /// How long to wait for more commits.
        window: Duration,
    },
}

impl Durability {
    /// Group commit within 2 ms.
    pub fn group() -> Self {
        Durability::Group {
            window: Duration::from_millis(2),
        }
    }

    pub(crate) fn window(self) -> Option<Duration> {
        match self {
            Durability::Immediate => None,
            Durability::Group { window } => Some(window),
        }
    }
}

/// The most commits written in one batch.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) const MAX_BATCH: usize = 512;
