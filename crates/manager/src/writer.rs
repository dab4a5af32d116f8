//! The control store's one writer: a thread of its own holding the database's only write
//! connection (rusqlite), running each job it is sent to the end before the next.
//!
//! A job is a closure over the connection, so that a whole group commit (`BEGIN IMMEDIATE`,
//! every statement of every write in the batch, `COMMIT`) is one hand-off between the async
//! world and the database, not one per statement: with sqlx each statement was a round trip
//! to its connection's thread, two thread wake-ups each, and those wake-ups were most of
//! deployd's CPU per task.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::Error;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the writer thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

pub(crate) fn sqlite_error(err: rusqlite::Error) -> Error {
    Error::Store(err.to_string())
}

impl Writer {
    /// Opens (creating it if missing) the database at `path` in WAL mode and starts the thread.
    pub(crate) fn open(path: &Path) -> Result<Self, Error> {
        let opened =
            |err: rusqlite::Error| Error::Store(format!("cannot open {}: {err}", path.display()));
        // Only the writer's thread uses the connection: SQLite's per-connection mutexes are
        // left out (multi-thread mode).
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(opened)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(opened)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(opened)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(opened)?;
        conn.set_prepared_statement_cache_capacity(64);
        let (jobs, received) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("deployd-store-writer".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok(job) = received.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|err| Error::Store(format!("cannot start the store's writer: {err}")))?;
        Ok(Self { jobs })
    }

    /// Hands `job` to the writer's thread, after the jobs sent before it, without waiting.
    pub(crate) fn spawn(
        &self,
        job: impl FnOnce(&mut Connection) + Send + 'static,
    ) -> Result<(), Error> {
        self.jobs
            .send(Box::new(job))
            .map_err(|_| Error::Store("the store's writer has stopped".to_owned()))
    }

    /// Runs `job` on the writer's connection, after the jobs sent before it.
    pub(crate) async fn call<T, F>(&self, job: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn: &mut Connection| {
                let _ = done.send(job(conn));
            }))
            .map_err(|_| Error::Store("the store's writer has stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| Error::Store("the store's writer has stopped".to_owned()))?
    }

    /// Runs `job` in one `BEGIN IMMEDIATE` transaction: committed when it returns `Ok`, rolled
    /// back otherwise.
    pub(crate) async fn transaction<T, F>(&self, job: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, Error> + Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sqlite_error)?;
            let value = job(&tx)?;
            tx.commit().map_err(sqlite_error)?;
            Ok(value)
        })
        .await
    }
}
