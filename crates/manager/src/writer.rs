//! The control store's one writer: a thread of its own holding the database's only write
//! connection (rusqlite), running each job it is sent to the end before the next.
//!
//! A job is a closure over the connection, so that a whole group commit (`BEGIN IMMEDIATE`,
//! every statement of every write in the batch, `COMMIT`) is one hand-off between the async
//! world and the database, not one per statement: with sqlx each statement was a round trip
//! to its connection's thread, two thread wake-ups each, and those wake-ups were most of
//! deployd's CPU per task. `run_here` runs a job on the caller's thread instead when the
//! writer's thread has nothing queued or running (the order stays the same). Checkpoints of
//! the write-ahead log run on a second thread with a connection of their own.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::Error;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the writer thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Job>,
    /// The connection: used by the thread, or by [`Writer::run_here`]'s caller when the thread
    /// has nothing to do; never by both at once.
    conn: Arc<Mutex<Connection>>,
    /// Jobs sent to the thread and not finished, plus one while [`Writer::run_here`] runs one.
    pending: Arc<AtomicUsize>,
    /// Dropped with the last handle: the checkpointer's thread then ends too.
    _checkpoints: mpsc::Sender<()>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

/// How often the checkpointer copies what the write-ahead log holds into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Log frames (pages) after a checkpoint above which the checkpointer waits for the writer
/// and starts the log over (a reader that kept an old snapshot can hold a passive checkpoint
/// back; the log must not grow without end).
const WAL_FRAMES_LIMIT: i64 = 16_384;

/// Bytes the log file is cut back to after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// The checkpointer's loop: a passive checkpoint (it never blocks the writer) every
/// [`CHECKPOINT_EVERY`], a truncating one when the log has grown past [`WAL_FRAMES_LIMIT`];
/// until `stopped` is disconnected (the last [`Writer`] handle is gone).
fn checkpoint_until_stopped(conn: &Connection, stopped: &mpsc::Receiver<()>) {
    let checkpoint = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            row.get::<_, i64>(1)
        })
    };
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
        match checkpoint("PASSIVE") {
            Ok(frames) if frames > WAL_FRAMES_LIMIT => {
                if let Err(err) = checkpoint("TRUNCATE") {
                    tracing::warn!(error = %err, "the store's checkpoint failed; will retry");
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "the store's checkpoint failed; will retry"),
        }
    }
}

/// The connection, also after a job panicked while holding it (SQLite rolls back what that
/// job left open when the next transaction begins).
fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        // Checkpoints run on a thread of their own (see `checkpoints`), not inside a commit: a
        // checkpoint copies pages into the database and syncs it, and a task whose commit ran
        // one waited milliseconds for it. After a checkpoint the log file is cut back to
        // `journal_size_limit`.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(opened)?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(opened)?;
        conn.set_prepared_statement_cache_capacity(64);
        let checkpointer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(opened)?;
        checkpointer
            .busy_timeout(Duration::from_secs(30))
            .map_err(opened)?;
        let (checkpoints, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("deployd-store-checkpoint".into())
            .spawn(move || checkpoint_until_stopped(&checkpointer, &stopped))
            .map_err(|err| Error::Store(format!("cannot start the store's checkpointer: {err}")))?;
        let (jobs, received) = mpsc::channel::<Job>();
        let conn = Arc::new(Mutex::new(conn));
        let pending = Arc::new(AtomicUsize::new(0));
        let (thread_conn, thread_pending) = (Arc::clone(&conn), Arc::clone(&pending));
        std::thread::Builder::new()
            .name("deployd-store-writer".into())
            .spawn(move || {
                while let Ok(job) = received.recv() {
                    job(&mut lock(&thread_conn));
                    thread_pending.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|err| Error::Store(format!("cannot start the store's writer: {err}")))?;
        Ok(Self {
            jobs,
            conn,
            pending,
            _checkpoints: checkpoints,
        })
    }

    /// Runs `job` on the calling thread, if the writer's thread has no job queued or running
    /// (so that the job keeps its place after every job sent before it); `None` otherwise.
    /// Spares a short job two thread wake-ups when the store is idle; the caller is blocked
    /// for as long as the job runs.
    pub(crate) fn run_here<T>(&self, job: impl FnOnce(&mut Connection) -> T) -> Option<T> {
        self.pending
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        let value = job(&mut lock(&self.conn));
        self.pending.fetch_sub(1, Ordering::SeqCst);
        Some(value)
    }

    /// Hands `job` to the writer's thread, after the jobs sent before it, without waiting.
    pub(crate) fn spawn(
        &self,
        job: impl FnOnce(&mut Connection) + Send + 'static,
    ) -> Result<(), Error> {
        self.send(Box::new(job))
    }

    fn send(&self, job: Job) -> Result<(), Error> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            Error::Store("the store's writer has stopped".to_owned())
        })
    }

    /// Runs `job` on the writer's connection, after the jobs sent before it.
    pub(crate) async fn call<T, F>(&self, job: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        self.send(Box::new(move |conn: &mut Connection| {
            let _ = done.send(job(conn));
        }))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A job runs on the caller's thread only while the writer's thread has nothing queued or
    /// running, so that it never overtakes a job sent before it.
    #[tokio::test]
    async fn a_job_runs_here_only_when_the_writer_is_idle() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let writer = Writer::open(&dir.path().join("store.db")).expect("the writer");
        assert_eq!(writer.run_here(|_| 1), Some(1), "an idle writer");
        let (release, hold) = mpsc::channel::<()>();
        writer
            .spawn(move |_| {
                let _ = hold.recv();
            })
            .expect("a job for the thread");
        assert!(
            writer.run_here(|_| 2).is_none(),
            "ran while the thread had a job"
        );
        release.send(()).expect("the held job");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(value) = writer.run_here(|_| 3) {
                assert_eq!(value, 3);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never got idle"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Commits reach the database file without any connection checkpointing on commit: the
    /// checkpointer's thread copies them there, and the log is started over.
    #[tokio::test]
    async fn the_checkpointer_moves_commits_into_the_database_file() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("store.db");
        let writer = Writer::open(&path).expect("the writer");
        let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
        writer
            .transaction(|tx| {
                tx.execute("CREATE TABLE t (v BLOB NOT NULL)", [])
                    .map_err(sqlite_error)?;
                Ok(())
            })
            .await
            .expect("the table");
        let before = size();
        for _ in 0..20 {
            writer
                .transaction(|tx| {
                    for _ in 0..50 {
                        tx.execute("INSERT INTO t (v) VALUES (zeroblob(1000))", [])
                            .map_err(sqlite_error)?;
                    }
                    Ok(())
                })
                .await
                .expect("the rows");
        }
        // About 1 MB committed: in the log until a checkpoint copies it into the file.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() < before + 900_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file stayed at {} bytes (it was {before})",
                size()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next write starts the log over: it does not grow past what one commit adds.
        writer
            .transaction(|tx| {
                tx.execute("INSERT INTO t (v) VALUES (zeroblob(1000))", [])
                    .map_err(sqlite_error)?;
                Ok(())
            })
            .await
            .expect("one more row");
        let frames = writer
            .call(|conn| {
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    row.get::<_, i64>(1)
                })
                .map_err(sqlite_error)
            })
            .await
            .expect("the log's size");
        assert!(frames < 10, "the log holds {frames} frames after a restart");
    }
}
