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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
///
/// The methods return a [`StoreFuture`]: a store that answers without waiting (the in-memory
/// one) returns [`StoreFuture::ready`], which costs no allocation; the others wrap their async
/// code in [`StoreFuture::new`].
pub trait Store: Send + Sync + 'static {
    /// Inserts `snapshot` unless a snapshot with its id exists; returns whether it did.
    /// Another snapshot at the same `(run_id, seq)` is an [`Error::Conflict`].
    fn insert<'a>(&'a self, snapshot: &'a Snapshot) -> StoreFuture<'a, bool>;

    /// Applies `transition` to snapshot `id` (and inserts the snapshot it carries), or fails
    /// with [`Error::IllegalTransition`] or [`Error::Conflict`] and changes nothing.
    fn transition<'a>(&'a self, id: &'a SnapshotId, transition: Transition) -> StoreFuture<'a, ()>;

    /// Claims a `created` snapshot (of `run`, or of any run, oldest first): it becomes `pending`
    /// under `lease`. Of concurrent claimers, exactly one gets each snapshot.
    fn claim<'a>(
        &'a self,
        run: Option<&'a RunId>,
        lease: Lease,
    ) -> StoreFuture<'a, Option<Snapshot>>;

    /// Takes back every `pending` or `running` snapshot whose lease expired before `now`: it
    /// becomes `created` with `attempt + 1`. Returns their ids.
    fn expire_leases(&self, now: Timestamp) -> StoreFuture<'_, Vec<SnapshotId>>;

    /// The snapshot `id`.
    fn get<'a>(&'a self, id: &'a SnapshotId) -> StoreFuture<'a, Snapshot>;

    /// The run's last snapshot (highest `seq`).
    fn latest<'a>(&'a self, run: &'a RunId) -> StoreFuture<'a, Option<Snapshot>>;

    /// The run's snapshots in `seq` order.
    fn history<'a>(&'a self, run: &'a RunId) -> StoreFuture<'a, Vec<Snapshot>>;

    /// Whether the store keeps snapshots in this process only (and never writes them out
    /// unless asked): a runner then gives it states as values, encoded to JSON when first
    /// read, instead of encoding each one.
    fn keeps_values(&self) -> bool {
        false
    }
}

/// What a [`Store`] method returns: a future of its result, which may be ready at once.
#[must_use = "a store call does nothing unless awaited"]
pub struct StoreFuture<'a, T>(Answer<'a, T>);

enum Answer<'a, T> {
    Ready(Option<Result<T, Error>>),
    Pending(Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>),
}

impl<'a, T> StoreFuture<'a, T> {
    /// A result known at once (no allocation).
    pub fn ready(result: Result<T, Error>) -> Self {
        StoreFuture(Answer::Ready(Some(result)))
    }

    /// The result of `future`.
    pub fn new(future: impl Future<Output = Result<T, Error>> + Send + 'a) -> Self {
        StoreFuture(Answer::Pending(Box::pin(future)))
    }
}

// Nothing in it is pinned structurally: the pending future is boxed, the result is moved out.
impl<T> Unpin for StoreFuture<'_, T> {}

impl<T> Future for StoreFuture<'_, T> {
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Answer::Ready(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(Error::Closed("polled after completion".to_owned()))),
            ),
            Answer::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for StoreFuture<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Answer::Ready(_) => "StoreFuture(ready)",
            Answer::Pending(_) => "StoreFuture(pending)",
        })
    }
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
pub(crate) const MAX_BATCH: usize = 1024;
