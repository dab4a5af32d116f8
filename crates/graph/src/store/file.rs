//! [`FileStore`]: an append-only log of snapshots, fsync'd, under an OS file lock.
//!
//! The log has one JSON array of snapshots per line; a line is one commit (a transition and the
//! snapshot it inserts), and a later version of a snapshot replaces an earlier one on replay.
//! A line cut short by a crash was never acknowledged and is dropped at the next open.
//! Appending is O(1) in the length of the history; [`FileStore::compact`] rewrites the log with
//! one version of each snapshot (to a temporary file, fsync'd, then renamed over the log).
//!
//! Only one process opens a log at a time: `{log}.lock` is locked with `flock`, which the
//! kernel releases when its holder dies, however it dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::table::Table;
use super::{Durability, MAX_BATCH, Store, StoreFuture};
use crate::clock::Timestamp;
use crate::snapshot::{self, Lease, RunId, Snapshot, SnapshotId, Transition};
use crate::{Error, fault};

/// Snapshots in an append-only log file: one line per commit (a JSON array of the snapshots it
/// wrote), fsync'd before it is acknowledged; a line cut short by a crash is dropped at the
/// next open. Only one process opens a log at a time (`flock` on `{log}.lock`, released by the
/// kernel when its holder dies). [`compact`](Self::compact) rewrites the log atomically.
#[derive(Debug, Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    table: Table,
    writer: Sender<Msg>,
    /// Set once a write failed: the table may hold what the log does not.
    broken: Option<String>,
}

enum Msg {
    Append {
        line: Vec<u8>,
        done: oneshot::Sender<std::io::Result<()>>,
    },
    Compact {
        content: Vec<u8>,
        done: oneshot::Sender<std::io::Result<()>>,
    },
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Append { .. } => "Append",
            Msg::Compact { .. } => "Compact",
        })
    }
}

impl FileStore {
    /// How long [`open`](Self::open) waits for another process to release the lock.
    pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

    /// Opens (or creates) the log at `path`, waiting up to [`LOCK_TIMEOUT`](Self::LOCK_TIMEOUT)
    /// for its lock.
    pub async fn open(path: impl Into<PathBuf>, durability: Durability) -> Result<Self, Error> {
        Self::open_with_timeout(path, durability, Self::LOCK_TIMEOUT).await
    }

    /// Opens (or creates) the log at `path`, waiting up to `timeout` for its lock
    /// ([`Error::Locked`] after that).
    pub async fn open_with_timeout(
        path: impl Into<PathBuf>,
        durability: Durability,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let path = path.into();
        tokio::task::spawn_blocking(move || open_blocking(path, durability, timeout))
            .await
            .map_err(|e| Error::Storage(format!("opening the log: {e}")))?
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Rewrites the log with the current version of every snapshot (nothing is dropped from
    /// any history), atomically.
    pub async fn compact(&self) -> Result<(), Error> {
        let done = {
            let state = self.lock()?;
            let all = state.table.all();
            let mut content = Vec::new();
            for chunk in all.chunk_by(|a, b| a.run_id == b.run_id) {
                content.extend(encode_line(chunk)?);
            }
            let (done, wait) = oneshot::channel();
            state
                .writer
                .send(Msg::Compact { content, done })
                .map_err(|_| closed())?;
            wait
        };
        self.wait(done).await
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, Error> {
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        match &state.broken {
            Some(why) => Err(Error::Closed(why.clone())),
            None => Ok(state),
        }
    }

    /// Applies `change` to the table and appends what it changed to the log, in one critical
    /// section (so the log's order is the table's), then waits until the line is durable.
    async fn commit<R>(
        &self,
        change: impl FnOnce(&mut Table) -> Result<(R, Vec<SnapshotId>), Error>,
    ) -> Result<R, Error> {
        let (result, done) = {
            let mut state = self.lock()?;
            let (result, changed) = change(&mut state.table)?;
            if changed.is_empty() {
                return Ok(result);
            }
            let snapshots = changed
                .iter()
                .map(|id| state.table.get(id))
                .collect::<Result<Vec<_>, _>>()?;
            let line = encode_line(&snapshots)?;
            let (done, wait) = oneshot::channel();
            if state.writer.send(Msg::Append { line, done }).is_err() {
                state.broken = Some("the log writer stopped".to_owned());
                return Err(closed());
            }
            (result, wait)
        };
        self.wait(done).await?;
        Ok(result)
    }

    async fn wait(&self, done: oneshot::Receiver<std::io::Result<()>>) -> Result<(), Error> {
        let outcome = match done.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(source)) => Error::Io {
                path: self.inner.path.clone(),
                source,
            },
            Err(_) => closed(),
        };
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        state.broken = Some(outcome.to_string());
        Err(outcome)
    }
}

fn closed() -> Error {
    Error::Closed("the log writer stopped".to_owned())
}

fn encode_line<S: serde::Serialize>(snapshots: &[S]) -> Result<Vec<u8>, Error> {
    let mut line = serde_json::to_vec(snapshots).map_err(|source| Error::Codec {
        what: "snapshots",
        source,
    })?;
    line.push(b'\n');
    Ok(line)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn open_blocking(
    path: PathBuf,
    durability: Durability,
    timeout: Duration,
) -> Result<FileStore, Error> {
    let lock_path = lock_path(&path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    let deadline = Instant::now() + timeout;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(TryLockError::WouldBlock) => return Err(Error::Locked { path: lock_path }),
            Err(TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: lock_path,
                    source,
                });
            }
        }
    }
    fault::point(fault::LOCKED);

    let existed = path.exists();
    let mut log = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .append(true)
        .open(&path)
        .map_err(io_error(&path))?;
    if !existed {
        sync_dir(&path).map_err(io_error(&path))?;
    }
    let mut bytes = Vec::new();
    log.read_to_end(&mut bytes).map_err(io_error(&path))?;
    let mut table = Table::new(true);
    let good = replay(&bytes, &mut table, &path)?;
    if good < bytes.len() {
        tracing::warn!(
            path = %path.display(),
            dropped = bytes.len() - good,
            "dropping a commit cut short by a crash"
        );
        log.set_len(good as u64).map_err(io_error(&path))?;
        log.sync_all().map_err(io_error(&path))?;
    }

    let (writer, rx) = std::sync::mpsc::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("graph-file-log".to_owned())
        .spawn(move || write_loop(rx, log, lock, thread_path, durability))
        .map_err(io_error(&path))?;
    Ok(FileStore {
        inner: Arc::new(Inner {
            path,
            state: Mutex::new(State {
                table,
                writer,
                broken: None,
            }),
        }),
    })
}

/// Replays the log into `table`; returns the length of its intact part.
fn replay(bytes: &[u8], table: &mut Table, path: &Path) -> Result<usize, Error> {
    let mut offset = 0;
    let mut line_no = 0;
    while offset < bytes.len() {
        line_no += 1;
        let Some(len) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            // No newline: the write of this commit was cut short.
            return Ok(offset);
        };
        let line = &bytes[offset..offset + len];
        let snapshots: Vec<Snapshot> = match std::str::from_utf8(line)
            .map_err(|e| e.to_string())
            .and_then(|text| snapshot::from_json(text).map_err(|e| e.to_string()))
        {
            Ok(snapshots) => snapshots,
            Err(err) => {
                return Err(Error::Storage(format!(
                    "{}:{line_no}: corrupt commit: {err}",
                    path.display()
                )));
            }
        };
        for s in snapshots {
            table.put(s);
        }
        offset += len + 1;
    }
    Ok(offset)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The writer thread: appends batches of commits and syncs each batch once. Holds the lock
/// file, so the lock is released only after the last write.
fn write_loop(
    rx: Receiver<Msg>,
    mut log: File,
    _lock: File,
    path: PathBuf,
    durability: Durability,
) {
    let mut pending: Option<Msg> = None;
    let mut last_batch = 1;
    loop {
        let first = match pending.take() {
            Some(msg) => msg,
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => return,
            },
        };
        let (line, done) = match first {
            Msg::Compact { content, done } => {
                let result = compact(&path, &content).map(|file| log = file);
                let _ = done.send(result);
                continue;
            }
            Msg::Append { line, done } => (line, done),
        };
        let mut buffer = line;
        let mut waiting = vec![done];
        // Take what is queued; wait for more only when commits are concurrent (a lone
        // sequential run would just pay the window on every step).
        let mut deadline = None;
        while waiting.len() < MAX_BATCH {
            let next = match deadline {
                None => match rx.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => match durability.window() {
                        Some(window) if last_batch > 1 || waiting.len() > 1 => {
                            deadline = Some(Instant::now() + window);
                            continue;
                        }
                        _ => None,
                    },
                },
                Some(deadline) => rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok(),
            };
            match next {
                Some(Msg::Append { line, done }) => {
                    buffer.extend_from_slice(&line);
                    waiting.push(done);
                }
                Some(compact) => {
                    pending = Some(compact);
                    break;
                }
                None => break,
            }
        }
        last_batch = waiting.len();
        let result = append(&mut log, &buffer);
        for done in waiting {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
        if result.is_err() {
            // Nothing more can be trusted to reach the log; refuse everything after.
            return;
        }
    }
}

fn append(log: &mut File, buffer: &[u8]) -> std::io::Result<()> {
    let half = buffer.len() / 2;
    log.write_all(&buffer[..half])?;
    fault::point(fault::MID_WRITE);
    log.write_all(&buffer[half..])?;
    log.sync_data()
}

fn compact(path: &Path, content: &[u8]) -> std::io::Result<File> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".compact");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(content)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)?;
    OpenOptions::new().append(true).open(path)
}

impl Store for FileStore {
    fn insert<'a>(&'a self, snapshot: &'a Snapshot) -> StoreFuture<'a, bool> {
        StoreFuture::new(self.commit(|table| {
            let new = table.insert(snapshot)?;
            Ok((
                new,
                if new {
                    vec![snapshot.id.clone()]
                } else {
                    vec![]
                },
            ))
        }))
    }

    fn transition<'a>(&'a self, id: &'a SnapshotId, transition: Transition) -> StoreFuture<'a, ()> {
        StoreFuture::new(self.commit(move |table| {
            let inserted = table.transition(id, transition)?;
            Ok(((), std::iter::once(id.clone()).chain(inserted).collect()))
        }))
    }

    fn claim<'a>(
        &'a self,
        run: Option<&'a RunId>,
        lease: Lease,
    ) -> StoreFuture<'a, Option<Snapshot>> {
        StoreFuture::new(self.commit(move |table| {
            let claimed = table.claim(run, &lease);
            let changed = claimed.iter().map(|s| s.id.clone()).collect();
            Ok((claimed, changed))
        }))
    }

    fn expire_leases(&self, now: Timestamp) -> StoreFuture<'_, Vec<SnapshotId>> {
        StoreFuture::new(self.commit(move |table| {
            let expired = table.expire(now);
            Ok((expired.clone(), expired))
        }))
    }

    fn get<'a>(&'a self, id: &'a SnapshotId) -> StoreFuture<'a, Snapshot> {
        StoreFuture::ready(self.lock().and_then(|state| state.table.get(id).cloned()))
    }

    fn latest<'a>(&'a self, run: &'a RunId) -> StoreFuture<'a, Option<Snapshot>> {
        StoreFuture::ready(self.lock().map(|state| state.table.latest(run).cloned()))
    }

    fn history<'a>(&'a self, run: &'a RunId) -> StoreFuture<'a, Vec<Snapshot>> {
        StoreFuture::ready(self.lock().map(|state| state.table.history(run)))
    }
}
