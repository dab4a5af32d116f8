//! The control plane: the store plus the live fan-out of task events.
//!
//! Every write of the task path (a task's create, its running mark, its events, its outcome)
//! goes through one group commit: what has queued up is committed as one transaction, on the
//! store's writer thread (or, for a small batch while that thread is idle, right on the async
//! thread), and whoever committed it hands each committed entry to its task's watches and the
//! live bus, then answers each writer.
//!
//! Invariant: every entry is committed to the store before anyone is told about it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::notifier::{Note, Notifier};
use crate::store::{CommitJob, ControlStore, Write, Written};
use crate::{Error, TaskEvent, TaskInfo};

/// Capacity of the live event bus (every entry of every task, for live views).
const BUS_CAPACITY: usize = 4096;

/// Entries a follower may have waiting; one that falls further behind is dropped from the
/// task's watchers and catches up from the store.
const WATCH_CAPACITY: usize = 256;

/// The followers of each task: the writer hands each committed entry to the followers of its
/// task only (a shared bus woke every follower for every entry of every task).
type Watchers = Arc<std::sync::Mutex<HashMap<String, Vec<mpsc::Sender<Arc<TaskEvent>>>>>>;

fn watchers_of(
    watchers: &Watchers,
) -> std::sync::MutexGuard<'_, HashMap<String, Vec<mpsc::Sender<Arc<TaskEvent>>>>> {
    watchers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hands a committed entry to its task's followers. A follower whose queue is full, or that
/// is gone, is dropped from the list (it catches up from the store); a final entry ends the
/// list.
fn notify(watchers: &Watchers, event: &Arc<TaskEvent>) {
    let mut all = watchers_of(watchers);
    let Some(list) = all.get_mut(&event.task_id) else {
        return;
    };
    list.retain(|watcher| watcher.try_send(Arc::clone(event)).is_ok());
    if list.is_empty() || event.kind.is_terminal() {
        all.remove(&event.task_id);
    }
}

/// How long a follower of a task in a cluster waits without news before it reads the store
/// (a note lost with a connection to the database).
const RESYNC: Duration = Duration::from_secs(1);

/// Sleeps [`RESYNC`] when `shared`, forever otherwise.
async fn resync(shared: bool) {
    if shared {
        tokio::time::sleep(RESYNC).await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// Writes of task logs are committed in batches: one transaction for what has queued up while
/// the previous one committed (group commit), at most this many.
const MAX_BATCH: usize = 256;

/// Batches handed to the writer's thread and not committed yet: one commits while the next
/// waits its turn, so the writer never waits for the async side to hand it work.
const BATCHES_IN_FLIGHT: usize = 2;

/// The largest batch committed on the async thread when the writer's thread is idle (bounds
/// how long that blocks the runtime: a few tens of microseconds).
const INLINE_BATCH: usize = 4;

/// Writes queued for the group commit; a writer waits while it is full.
const WRITE_QUEUE: usize = 8192;

pub(crate) struct Control {
    store: Arc<dyn ControlStore>,
    /// This node's id: the owner its workers write on the tasks they run.
    node: Arc<str>,
    /// Carries notes between the nodes of a cluster.
    notifier: Arc<Notifier>,
    /// Whether other nodes write to the store too: a follower then also reads the store
    /// after [`RESYNC`] without news, in case a note went missing.
    shared: bool,
    bus: broadcast::Sender<Arc<TaskEvent>>,
    watchers: Watchers,
    closed: watch::Sender<bool>,
    /// Names of deployments as they are deleted: their followers end.
    deleted: broadcast::Sender<Arc<str>>,
    writes: mpsc::Sender<Pending>,
    /// Transactions the writer committed; for tests of the batching.
    #[cfg_attr(not(test), allow(dead_code))]
    commits: Arc<AtomicU64>,
    /// Commits that failed (and were retried); for tests of the single writer.
    #[cfg_attr(not(test), allow(dead_code))]
    failed_commits: Arc<AtomicU64>,
    /// Tasks a worker of this server is running now, with the port of the replica it calls
    /// (0 until it calls one); see [`Control::claim`].
    running: std::sync::Mutex<HashMap<String, Running>>,
    /// Tasks created here in a new session and not taken by a worker yet; see
    /// [`Control::take_fresh`].
    fresh: std::sync::Mutex<HashMap<String, TaskInfo>>,
}

/// A task a worker of this server runs: the port of the replica it calls (0 until it calls
/// one), and the signal that tells the worker the task was cancelled.
#[derive(Debug, Default)]
struct Running {
    port: u16,
    cancelled: Arc<tokio::sync::Notify>,
}

/// A task this server runs; dropping it lets a later delivery of the task run it again.
pub(crate) struct Claim<'a> {
    control: &'a Control,
    task: String,
}

impl Claim<'_> {
    /// Records the port of the replica the task is handed to.
    pub(crate) fn calls(&self, port: u16) {
        if let Some(entry) = self.control.running_tasks().get_mut(&self.task) {
            entry.port = port;
        }
    }

    /// Completes once the task is cancelled (see [`Control::cancel_running`]).
    pub(crate) fn cancelled(&self) -> Arc<tokio::sync::Notify> {
        self.control
            .running_tasks()
            .get(&self.task)
            .map(|entry| Arc::clone(&entry.cancelled))
            .unwrap_or_default()
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.control.running_tasks().remove(&self.task);
    }
}

/// A write waiting for its commit; answered with whether it was applied (a conditional
/// finish is not applied to a task that has started or ended).
struct Pending {
    write: Write,
    done: oneshot::Sender<Result<Written, Error>>,
}

/// What the writer's thread does once a batch is committed: each entry goes to its task's
/// followers and to the bus, each writer gets its answer.
fn answer(
    writers: Vec<oneshot::Sender<Result<Written, Error>>>,
    written: Result<Vec<Written>, Error>,
    watchers: &Watchers,
    bus: &broadcast::Sender<Arc<TaskEvent>>,
) {
    match written {
        Ok(written) => {
            for (writer, mut written) in writers.into_iter().zip(written) {
                if let Some(event) = written.event.take() {
                    let event = Arc::new(event);
                    notify(watchers, &event);
                    if bus.receiver_count() > 0 {
                        let _ = bus.send(event);
                    }
                }
                let _ = writer.send(Ok(written));
            }
        }
        Err(err) => {
            let message = err.to_string();
            for writer in writers {
                let _ = writer.send(Err(Error::Store(message.clone())));
            }
        }
    }
}

/// Hands the entries other nodes commit (their notes) to this node's followers: a note with the
/// entry goes as it is; one without (too large for a note) is read from the store.
fn relay_entries(
    notifier: &Notifier,
    store: &Arc<dyn ControlStore>,
    watchers: &Watchers,
    bus: &broadcast::Sender<Arc<TaskEvent>>,
) {
    let mut notes = notifier.subscribe_entries();
    let store = Arc::downgrade(store);
    let watchers = Arc::downgrade(watchers);
    let bus = bus.clone();
    tokio::spawn(async move {
        loop {
            let note = match notes.recv().await {
                Ok(note) => note,
                // Followers read the store after a while without news.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Note::Entry { t, s, .. } = &*note else {
                continue;
            };
            let (Some(store), Some(watchers)) = (store.upgrade(), watchers.upgrade()) else {
                return;
            };
            let event = match note.event() {
                Some(event) => event,
                None => match store.log_after(t, s.saturating_sub(1)).await {
                    Ok(Some((events, _))) => match events.into_iter().find(|e| e.seq == *s) {
                        Some(event) => event,
                        None => continue,
                    },
                    _ => continue,
                },
            };
            let event = Arc::new(event);
            notify(&watchers, &event);
            if bus.receiver_count() > 0 {
                let _ = bus.send(event);
            }
        }
    });
}

impl Control {
    fn running_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks `task` as running here, or `None` when a worker of this server runs it already:
    /// a queue delivers at least once, and a requeue after a restart or a queue change can
    /// deliver a task whose earlier message the broker still holds.
    pub(crate) fn claim(&self, task: &str) -> Option<Claim<'_>> {
        let mut running = self.running_tasks();
        if running.contains_key(task) {
            return None;
        }
        running.insert(task.to_owned(), Running::default());
        Some(Claim {
            control: self,
            task: task.to_owned(),
        })
    }

    /// The port of the replica that runs `task` here, if a worker of this node runs it.
    pub(crate) fn running_port(&self, task: &str) -> Option<u16> {
        self.running_tasks()
            .get(task)
            .map(|entry| entry.port)
            .filter(|port| *port != 0)
    }

    /// Tells the worker of this node that runs `task` that it was cancelled; the port of the
    /// replica it calls, when a worker here runs it and calls one.
    pub(crate) fn cancel_running(&self, task: &str) -> Option<u16> {
        let running = self.running_tasks();
        let entry = running.get(task)?;
        entry.cancelled.notify_one();
        Some(entry.port).filter(|port| *port != 0)
    }

    fn fresh_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskInfo>> {
        self.fresh
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers a task just created in a new session (call it before its create is queued):
    /// the worker that takes it needs no read of the store and need not wait for its running
    /// mark to commit before it calls the service.
    pub(crate) fn remember_fresh(&self, task: &TaskInfo) {
        self.fresh_tasks().insert(task.id.clone(), task.clone());
    }

    /// Takes a task [`Control::remember_fresh`] kept. Only the holder of the task's
    /// [`Claim`] may call this with intent to run it: a worker, or the watchdog failing it; a
    /// cancel takes it to drop it, so that the worker reads the store (and finds it ended).
    pub(crate) fn take_fresh(&self, task_id: &str) -> Option<TaskInfo> {
        self.fresh_tasks().remove(task_id)
    }

    /// Forgets the fresh tasks of a deployment that is being deleted.
    pub(crate) fn forget_fresh(&self, deployment: &str) {
        self.fresh_tasks()
            .retain(|_, task| task.deployment != deployment);
    }

    /// Queues the running mark of a task taken with [`Control::take_fresh`], without waiting
    /// for its commit: the task's events and outcome are queued after it.
    pub(crate) async fn mark_running(&self, task_id: &str, attempt: u32) -> Result<(), Error> {
        self.enqueue(Write::Running {
            task_id: task_id.to_owned(),
            attempt,
            node: Arc::clone(&self.node),
        })
        .await
        .map(drop)
    }

    /// The control plane over `store`, with its group commit started: a task that takes what
    /// has queued up (at most [`MAX_BATCH`] writes) and hands it to the store's writer thread
    /// as one transaction, with at most [`BATCHES_IN_FLIGHT`] batches handed over and not yet
    /// committed (while they commit, the next batch fills up). The writer's thread answers the
    /// writers and the followers itself.
    pub(crate) fn new(store: Arc<dyn ControlStore>, node: &str, notifier: Arc<Notifier>) -> Self {
        let (bus, _) = broadcast::channel(BUS_CAPACITY);
        let watchers: Watchers = Arc::default();
        let (closed, _) = watch::channel(false);
        let (writes, mut queued) = mpsc::channel::<Pending>(WRITE_QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let failed_commits = Arc::new(AtomicU64::new(0));
        {
            let store = store.clone();
            let bus = bus.clone();
            let watchers = Arc::clone(&watchers);
            let commits = Arc::clone(&commits);
            let failed = Arc::clone(&failed_commits);
            let closed = closed.subscribe();
            let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
            tokio::spawn(async move {
                loop {
                    let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                        return;
                    };
                    let mut batch = Vec::with_capacity(MAX_BATCH);
                    if queued.recv_many(&mut batch, MAX_BATCH).await == 0 {
                        return; // every sender is gone
                    }
                    // One turn for the tasks that are about to write: a worker handed the task
                    // just created marks it running, and both go in this commit, not one each.
                    tokio::task::yield_now().await;
                    while batch.len() < MAX_BATCH {
                        match queued.try_recv() {
                            Ok(pending) => batch.push(pending),
                            Err(_) => break,
                        }
                    }
                    let (writes, writers): (Vec<Write>, Vec<_>) =
                        batch.into_iter().map(|p| (p.write, p.done)).unzip();
                    // A small batch while the writer's thread is idle (a quiet server) commits
                    // right here: no hand-off to that thread and back. A failure goes to the
                    // thread, which retries it before anything queued after it.
                    if writes.len() <= INLINE_BATCH
                        && let Some(written) = store.commit_here(&writes)
                    {
                        match written {
                            Ok(written) => {
                                commits.fetch_add(1, Ordering::Relaxed);
                                answer(writers, Ok(written), &watchers, &bus);
                                drop(permit);
                                continue;
                            }
                            Err(err) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tracing::error!(error = %err, writes = writes.len(), "cannot commit task log writes; retrying");
                            }
                        }
                    }
                    let (bus, watchers) = (bus.clone(), Arc::clone(&watchers));
                    let commits = Arc::clone(&commits);
                    let handed = store.commit(CommitJob {
                        writes,
                        closed: closed.clone(),
                        failures: Arc::clone(&failed),
                        done: Box::new(move |written| {
                            commits.fetch_add(1, Ordering::Relaxed);
                            answer(writers, written, &watchers, &bus);
                            drop(permit);
                        }),
                    });
                    if handed.is_err() {
                        tracing::error!("the store's writer has stopped; task writes fail");
                        return;
                    }
                }
            });
        }
        let (deleted, _) = broadcast::channel(64);
        let shared = notifier.is_shared();
        if shared {
            relay_entries(&notifier, &store, &watchers, &bus);
        }
        Self {
            store,
            node: Arc::from(node),
            notifier,
            shared,
            bus,
            watchers,
            closed,
            deleted,
            writes,
            commits,
            failed_commits,
            running: std::sync::Mutex::default(),
            fresh: std::sync::Mutex::default(),
        }
    }

    pub(crate) fn store(&self) -> &dyn ControlStore {
        &*self.store
    }

    /// The notifier between the nodes of the cluster.
    pub(crate) fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.bus.subscribe()
    }

    /// Queues a write for the batched writer: once this returns, every write queued later is
    /// committed after it (the writer keeps their order). The answer says when it is committed
    /// and broadcast, and what it did.
    async fn enqueue(&self, write: Write) -> Result<Committing, Error> {
        let (done, committed) = oneshot::channel();
        self.writes
            .send(Pending { write, done })
            .await
            .map_err(|_| Error::Store("the task log writer has stopped".to_owned()))?;
        Ok(Committing(committed))
    }

    /// Queues a write for the batched writer and waits until it is committed and broadcast;
    /// returns what it did.
    async fn commit(&self, write: Write) -> Result<Written, Error> {
        self.enqueue(write).await?.done().await
    }

    /// Queues a new task (`queued`) and, with `new_session`, its session for the writer's next
    /// group commit. A write queued after this returns (a worker's [`Control::start`] of the
    /// task) is committed after it; await the answer for the task to be stored.
    pub(crate) async fn create(
        &self,
        task: &TaskInfo,
        new_session: bool,
    ) -> Result<Committing, Error> {
        self.enqueue(Write::Create {
            task: task.clone(),
            new_session,
        })
        .await
    }

    /// Marks a task running its attempt `attempt` and returns it with its session's state;
    /// `None` when it has ended or is gone.
    pub(crate) async fn start(
        &self,
        task_id: &str,
        attempt: u32,
    ) -> Result<Option<(TaskInfo, Option<Value>)>, Error> {
        self.commit(Write::Running {
            task_id: task_id.to_owned(),
            attempt,
            node: Arc::clone(&self.node),
        })
        .await
        .map(|written| written.started)
    }

    /// Queues a streamed event of attempt `attempt` for the task's log, without waiting for
    /// its commit: the task's outcome, queued after it, is committed after it, and whoever
    /// waits for the outcome waits for the event too. Waits only while the writer's queue is
    /// full.
    pub(crate) async fn event(
        &self,
        task_id: &str,
        attempt: u32,
        data: Value,
    ) -> Result<(), Error> {
        self.enqueue(Write::Event {
            task_id: task_id.to_owned(),
            attempt,
            data,
        })
        .await
        .map(drop)
    }

    /// Commits the task's outcome (its final entry, its status, its session's state).
    pub(crate) async fn finish(
        &self,
        task: &TaskInfo,
        outcome: Result<Value, String>,
        state: Option<Value>,
    ) -> Result<(), Error> {
        self.commit(Write::Finish {
            task_id: task.id.clone(),
            session_id: task.session_id.clone(),
            attempt: task.attempt,
            outcome,
            state,
            only_if_queued: false,
            cancelled: false,
        })
        .await
        .map(drop)
    }

    /// Ends a task that has not ended as `cancelled`, with `message` (who cancelled it) as its
    /// last entry; returns whether it did (a task that ended meanwhile keeps its outcome).
    pub(crate) async fn cancel(&self, task: &TaskInfo, message: String) -> Result<bool, Error> {
        self.commit(Write::Finish {
            task_id: task.id.clone(),
            session_id: task.session_id.clone(),
            attempt: task.attempt,
            outcome: Err(message),
            state: None,
            only_if_queued: false,
            cancelled: true,
        })
        .await
        .map(|written| written.applied)
    }

    /// Fails a task that no worker has started, with `message`; returns whether it did (a task
    /// that started or ended meanwhile is left alone).
    pub(crate) async fn fail_queued(
        &self,
        task: &TaskInfo,
        message: String,
    ) -> Result<bool, Error> {
        self.commit(Write::Finish {
            task_id: task.id.clone(),
            session_id: task.session_id.clone(),
            attempt: task.attempt,
            outcome: Err(message),
            state: None,
            only_if_queued: true,
            cancelled: false,
        })
        .await
        .map(|written| written.applied)
    }

    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    /// Ends the followers of the tasks of `deployment`, which is being deleted.
    pub(crate) fn deleted(&self, deployment: &str) {
        let _ = self.deleted.send(Arc::from(deployment));
    }

    /// Watches a task that is not stored yet (call it before [`Control::create`]): its every
    /// entry comes to this watch, straight from the writer; see [`Control::outcome`].
    pub(crate) fn watch_new(&self, deployment: String, task_id: String) -> NewWatch {
        NewWatch {
            live: Self::watch(&self.watchers, &task_id),
            deleted: self.deleted.subscribe(),
            closed: self.closed.subscribe(),
            unwatch: Unwatch {
                watchers: Arc::clone(&self.watchers),
                task_id: task_id.clone(),
            },
            deployment,
            task_id,
        }
    }

    /// The final entry of a task watched since before it was stored; `None` when its log ends
    /// without one (its deployment was deleted, deployd shuts down). Reads the store only when
    /// the watch fell behind.
    pub(crate) async fn outcome(&self, watch: NewWatch) -> Option<TaskEvent> {
        let NewWatch {
            mut live,
            mut deleted,
            mut closed,
            unwatch,
            deployment,
            task_id,
        } = watch;
        let mut last = 0;
        // `Some(outcome)` when the watch decided; `None` when it fell behind.
        let decided = loop {
            let received = tokio::select! {
                received = live.recv() => received,
                _ = closed.wait_for(|closed| *closed) => break Some(None),
                () = resync(self.shared) => break None,
                gone = deleted.recv() => match gone {
                    Ok(name) if *name == *deployment => break Some(None),
                    Ok(_) => continue,
                    // Missed some deletions: the follower checks in the store.
                    Err(_) => break None,
                },
            };
            match received {
                Some(event) if event.seq <= last => {}
                Some(event) if event.seq == last + 1 => {
                    last = event.seq;
                    if event.kind.is_terminal() {
                        break Some(Some(TaskEvent::clone(&event)));
                    }
                }
                // A gap, or the writer dropped the watch (its queue was full).
                _ => break None,
            }
        };
        // The watch goes before its list entry is cleaned up, so that the cleanup finds it
        // closed.
        drop(live);
        drop(unwatch);
        if let Some(outcome) = decided {
            return outcome;
        }
        // Follow from the last entry seen, through the store.
        let mut events = self.follow(deployment, task_id, last);
        while let Some(event) = events.recv().await {
            if event.kind.is_terminal() {
                return Some(event);
            }
        }
        None
    }

    fn watch(watchers: &Watchers, task_id: &str) -> mpsc::Receiver<Arc<TaskEvent>> {
        let (watch, live) = mpsc::channel(WATCH_CAPACITY);
        watchers_of(watchers)
            .entry(task_id.to_owned())
            .or_default()
            .push(watch);
        live
    }

    /// Follows a task of `deployment` from the log entry after `after` until its terminal
    /// entry, the receiver being dropped, the deployment being deleted, or shutdown.
    pub(crate) fn follow(
        &self,
        deployment: String,
        task_id: String,
        after: u64,
    ) -> mpsc::Receiver<TaskEvent> {
        let (tx, rx) = mpsc::channel(64);
        let watchers = Arc::clone(&self.watchers);
        // Taken before this returns: an entry committed from now on comes to it.
        let mut first = Some(Self::watch(&watchers, &task_id));
        let mut deleted = self.deleted.subscribe();
        let store = Arc::clone(&self.store);
        let mut closed = self.closed.subscribe();
        let shared = self.shared;
        tokio::spawn(async move {
            let _unwatch = Unwatch {
                watchers: Arc::clone(&watchers),
                task_id: task_id.clone(),
            };
            let mut last = after;
            loop {
                // Watch first, then catch up from the store: every entry committed before the
                // watch is in the store, every one after comes to the watch.
                let mut live = first
                    .take()
                    .unwrap_or_else(|| Self::watch(&watchers, &task_id));
                // A task deleted before this follower subscribed has no more entries coming.
                let (stored, ended) = match store.log_after(&task_id, last).await {
                    Ok(Some(log)) => log,
                    Ok(None) => return,
                    Err(err) => {
                        tracing::warn!(task = %task_id, error = %err, "cannot read task events");
                        return;
                    }
                };
                let caught_up = stored.is_empty();
                for event in stored {
                    last = event.seq;
                    let terminal = event.kind.is_terminal();
                    if tx.send(event).await.is_err() || terminal {
                        return;
                    }
                }
                // Nothing after `after` and the task has ended: the follower asked to resume
                // after the end (or past it); nothing more will come.
                if caught_up && ended {
                    return;
                }
                // Then live, until a gap or a lag sends us back to the store.
                loop {
                    let received = tokio::select! {
                        received = live.recv() => received,
                        _ = closed.wait_for(|closed| *closed) => return,
                        () = tx.closed() => return,
                        () = resync(shared) => break,
                        gone = deleted.recv() => match gone {
                            Ok(name) if *name == *deployment => return,
                            Ok(_) => continue,
                            // Missed some deletions: check in the store.
                            Err(_) => break,
                        },
                    };
                    match received {
                        // Already sent, or before where the follower resumes; its end ends
                        // the stream all the same.
                        Some(event) if event.seq <= last => {
                            if event.kind.is_terminal() {
                                return;
                            }
                        }
                        Some(event) if event.seq == last + 1 => {
                            last = event.seq;
                            let terminal = event.kind.is_terminal();
                            if tx.send(TaskEvent::clone(&event)).await.is_err() || terminal {
                                return;
                            }
                        }
                        // A gap, or the writer dropped this watch (its queue was full).
                        Some(_) | None => break,
                    }
                }
            }
        });
        rx
    }

    pub(crate) async fn close(&self) {
        let _ = self.closed.send(true);
        self.store.close().await;
    }
}

/// A queued write's answer.
pub(crate) struct Committing(oneshot::Receiver<Result<Written, Error>>);

impl Committing {
    /// Waits until the write is committed and broadcast; what it did.
    pub(crate) async fn done(self) -> Result<Written, Error> {
        self.0
            .await
            .map_err(|_| Error::Store("the task log writer has stopped".to_owned()))?
    }
}

/// A watch taken with [`Control::watch_new`].
pub(crate) struct NewWatch {
    live: mpsc::Receiver<Arc<TaskEvent>>,
    deleted: broadcast::Receiver<Arc<str>>,
    closed: watch::Receiver<bool>,
    // Declared after `live`: dropped after it, so it finds the watch closed.
    unwatch: Unwatch,
    deployment: String,
    task_id: String,
}

impl std::fmt::Debug for NewWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewWatch")
            .field("task_id", &self.task_id)
            .finish()
    }
}

/// Removes a follower's closed watches of its task when the follower ends.
struct Unwatch {
    watchers: Watchers,
    task_id: String,
}

impl Drop for Unwatch {
    fn drop(&mut self) {
        let mut all = watchers_of(&self.watchers);
        if let Some(list) = all.get_mut(&self.task_id) {
            list.retain(|watcher| !watcher.is_closed());
            if list.is_empty() {
                all.remove(&self.task_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::{EventKind, TaskStatus};

    #[tokio::test]
    async fn a_running_task_cannot_be_claimed_twice() {
        let (_dir, control, task) = control().await;
        let first = control.claim(&task.id).expect("the first claim wins");
        assert!(control.claim(&task.id).is_none(), "a duplicate delivery");
        assert!(control.claim("other").is_some(), "claims are per task");
        drop(first);
        assert!(
            control.claim(&task.id).is_some(),
            "a later delivery may run the task once the first is done"
        );
    }

    async fn control() -> (tempfile::TempDir, Control, TaskInfo) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        store.create_session("s", "d").await.unwrap();
        let task = TaskInfo {
            id: "t".into(),
            deployment: "d".into(),
            service: "svc".into(),
            session_id: "s".into(),
            input: json!({"a": 1}),
            status: TaskStatus::Queued,
            attempt: 0,
            result: None,
            error: None,
        };
        store.insert_task(&task).await.unwrap();
        (
            dir,
            Control::new(Arc::new(store), "node", Arc::new(Notifier::local("node"))),
            task,
        )
    }

    /// Waits (at most 5 s) until no watch of any task is left.
    async fn no_watch_left(control: &Control) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !watchers_of(&control.watchers).is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a watch was left behind");
    }

    async fn collect(mut rx: mpsc::Receiver<TaskEvent>) -> Vec<(u64, EventKind, Value)> {
        let mut seen = Vec::new();
        while let Some(event) = rx.recv().await {
            seen.push((event.seq, event.kind, event.data));
        }
        seen
    }

    #[tokio::test]
    async fn a_follower_sees_stored_then_live_entries_in_order() {
        let (_dir, control, task) = control().await;
        control.event("t", 1, json!(1)).await.unwrap();
        let follower = tokio::spawn(collect(control.follow("d".into(), "t".into(), 0)));
        control.event("t", 1, json!(2)).await.unwrap();
        control
            .finish(&task, Ok(json!("done")), Some(json!({"n": 1})))
            .await
            .unwrap();
        assert_eq!(
            follower.await.unwrap(),
            [
                (1, EventKind::Event, json!(1)),
                (2, EventKind::Event, json!(2)),
                (3, EventKind::Result, json!("done")),
            ]
        );
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Succeeded);
        assert_eq!(stored.result, Some(json!("done")));
        let (_, state) = control.store().session("s").await.unwrap().unwrap();
        assert_eq!(state, Some(json!({"n": 1})));
    }

    #[tokio::test]
    async fn a_follower_resumes_after_the_last_entry_it_saw() {
        let (_dir, control, task) = control().await;
        for n in 1..=3 {
            control.event("t", 1, json!(n)).await.unwrap();
        }
        control
            .finish(&task, Err("failed".into()), None)
            .await
            .unwrap();
        let seen = collect(control.follow("d".into(), "t".into(), 2)).await;
        assert_eq!(
            seen,
            [
                (3, EventKind::Event, json!(3)),
                (4, EventKind::Error, json!("failed")),
            ]
        );
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Failed);
        assert_eq!(stored.error.as_deref(), Some("failed"));
    }

    #[tokio::test]
    async fn a_lagging_follower_catches_up_from_the_store() {
        let (_dir, control, task) = control().await;
        let rx = control.follow("d".into(), "t".into(), 0);
        // More entries than a follower's watch holds, before the follower reads any: the
        // writer drops the watch and the follower catches up from the store.
        for n in 0..(BUS_CAPACITY + 10) {
            control.event("t", 1, json!(n)).await.unwrap();
        }
        control.finish(&task, Ok(json!("end")), None).await.unwrap();
        let seen = collect(rx).await;
        assert_eq!(seen.len(), BUS_CAPACITY + 11);
        assert!(
            seen.iter()
                .enumerate()
                .all(|(i, (seq, _, _))| *seq == i as u64 + 1)
        );
    }

    /// The outcome of a task watched before it was stored: from the watch, also when the watch
    /// fell behind (more entries than it holds) and the store has to fill the gap; none when the
    /// deployment is deleted first. No watch is left behind.
    #[tokio::test]
    async fn a_new_task_s_outcome_comes_to_its_watch() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        let control = Control::new(Arc::new(store), "node", Arc::new(Notifier::local("node")));
        let task = |id: &str| TaskInfo {
            id: id.into(),
            deployment: "d".into(),
            service: "svc".into(),
            session_id: format!("s-{id}"),
            input: json!({}),
            status: TaskStatus::Queued,
            attempt: 0,
            result: None,
            error: None,
        };
        for (id, events) in [("quick", 1), ("chatty", WATCH_CAPACITY + 50)] {
            let watch = control.watch_new("d".into(), id.into());
            let created = task(id);
            control
                .create(&created, true)
                .await
                .unwrap()
                .done()
                .await
                .unwrap();
            for n in 0..events {
                control.event(id, 1, json!(n)).await.unwrap();
            }
            control
                .finish(&created, Ok(json!("end")), None)
                .await
                .unwrap();
            let outcome = control.outcome(watch).await.expect("an outcome");
            assert_eq!(
                (outcome.kind, outcome.data),
                (EventKind::Result, json!("end"))
            );
            assert_eq!(outcome.seq, events as u64 + 1, "{id}");
        }
        let watch = control.watch_new("d".into(), "orphan".into());
        control.deleted("d");
        assert!(control.outcome(watch).await.is_none());
        // The follower that filled the gap ends on its own task.
        no_watch_left(&control).await;
    }

    /// A task remembered as fresh is taken once; a deleted deployment's are forgotten. A
    /// running mark queued for a fresh task is committed before its outcome.
    #[tokio::test]
    async fn a_fresh_task_is_taken_once() {
        let (_dir, control, task) = control().await;
        control.remember_fresh(&task);
        let mut other = task.clone();
        other.id = "u".into();
        other.deployment = "gone".into();
        control.remember_fresh(&other);
        control.forget_fresh("gone");
        assert!(
            control.take_fresh("u").is_none(),
            "a deleted deployment's task is forgotten"
        );
        let taken = control.take_fresh("t").expect("the fresh task");
        assert_eq!(taken.input, task.input);
        assert!(control.take_fresh("t").is_none(), "taken twice");

        control.mark_running("t", 1).await.unwrap();
        control
            .finish(&task, Ok(json!("done")), None)
            .await
            .unwrap();
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Succeeded);
        assert_eq!(stored.attempt, 1, "the running mark was committed first");
    }

    /// A follower that ends (its task ended, or its receiver was dropped) leaves nothing in
    /// the watch lists: a long-running server does not grow with the tasks it followed.
    #[tokio::test]
    async fn ended_followers_leave_no_watch_behind() {
        let (_dir, control, task) = control().await;
        let finished = control.follow("d".into(), "t".into(), 0);
        let mut dropped = control.follow("d".into(), "t".into(), 0);
        control.event("t", 1, json!("one")).await.unwrap();
        assert_eq!(dropped.recv().await.map(|e| e.seq), Some(1));
        drop(dropped);
        control.finish(&task, Ok(json!("end")), None).await.unwrap();
        assert_eq!(collect(finished).await.len(), 2);
        // A follower of a task that has ended already reads it from the store.
        assert_eq!(
            collect(control.follow("d".into(), "t".into(), 0))
                .await
                .len(),
            2
        );
        no_watch_left(&control).await;
    }

    #[tokio::test]
    async fn a_follower_that_resumes_past_the_end_ends() {
        let (_dir, control, task) = control().await;
        // Live: resumes after 5 while the task runs; its end (entry 2) ends the stream.
        let past = control.follow("d".into(), "t".into(), 5);
        control.event("t", 1, json!("one")).await.unwrap();
        control.finish(&task, Ok(json!("end")), None).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), collect(past)).await;
        assert_eq!(ended.expect("the stream ends with the task").len(), 0);
        // Stored: after the last entry, and far past it, of a task that has ended.
        for after in [2, 100] {
            let follower = control.follow("d".into(), "t".into(), after);
            let ended = tokio::time::timeout(Duration::from_secs(5), collect(follower)).await;
            assert_eq!(
                ended.expect("the stream ends at once").len(),
                0,
                "after {after}"
            );
        }
        no_watch_left(&control).await;
    }

    #[tokio::test]
    async fn entries_carry_the_attempt_that_wrote_them() {
        let (_dir, control, mut task) = control().await;
        control.event("t", 1, json!("first try")).await.unwrap();
        control.event("t", 2, json!("second try")).await.unwrap();
        task.attempt = 2;
        control
            .finish(&task, Ok(json!("done")), None)
            .await
            .unwrap();
        let attempts: Vec<u32> = control
            .store()
            .events_after("t", 0)
            .await
            .unwrap()
            .unwrap()
            .iter()
            .map(|e| e.attempt)
            .collect();
        assert_eq!(attempts, [1, 2, 2]);
    }

    #[tokio::test]
    async fn pruning_deletes_ended_tasks_and_their_events_only() {
        let (_dir, control, task) = control().await;
        let mut waiting = task.clone();
        waiting.id = "w".into();
        control.store().insert_task(&waiting).await.unwrap();
        control
            .event(&task.id, 1, json!({"step": 1}))
            .await
            .unwrap();
        control
            .finish(&task, Ok(json!("done")), None)
            .await
            .unwrap();
        let store = control.store();
        // Ended after `before`: kept.
        assert_eq!(
            store
                .prune_ended(crate::store::now_ms() - 60_000, 10)
                .await
                .unwrap(),
            0
        );
        assert!(store.task("t").await.unwrap().is_some());
        // Ended before it: gone with its events; the task still waiting stays.
        let later = crate::store::now_ms() + 1_000;
        assert_eq!(store.prune_ended(later, 10).await.unwrap(), 1);
        assert!(store.task("t").await.unwrap().is_none());
        assert!(store.events_after("t", 0).await.unwrap().is_none());
        assert!(store.task("w").await.unwrap().is_some());
        assert_eq!(store.prune_ended(later, 10).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_finished_task_keeps_its_first_outcome() {
        let (_dir, control, task) = control().await;
        control
            .finish(&task, Ok(json!("first")), None)
            .await
            .unwrap();
        control
            .finish(&task, Err("second".into()), None)
            .await
            .unwrap();
        assert!(!control.fail_queued(&task, "late".into()).await.unwrap());
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Succeeded);
        assert_eq!(stored.result, Some(json!("first")));
        assert_eq!(
            control
                .store()
                .events_after("t", 0)
                .await
                .unwrap()
                .unwrap()
                .len(),
            1
        );
        assert!(
            !control
                .store()
                .set_task_status("t", TaskStatus::Running, 3)
                .await
                .unwrap(),
            "a finished task is not started again"
        );
    }

    #[tokio::test]
    async fn only_a_queued_task_is_failed_while_it_waits() {
        let (_dir, control, task) = control().await;
        assert!(
            control
                .store()
                .set_task_status("t", TaskStatus::Running, 1)
                .await
                .unwrap()
        );
        assert!(!control.fail_queued(&task, "waited".into()).await.unwrap());
        control.store().requeue("t").await.unwrap();
        assert!(control.fail_queued(&task, "waited".into()).await.unwrap());
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Failed);
        assert_eq!(stored.error.as_deref(), Some("waited"));
    }

    #[tokio::test]
    async fn closing_ends_followers() {
        let (_dir, control, _task) = control().await;
        let rx = control.follow("d".into(), "t".into(), 0);
        control.close().await;
        assert!(collect(rx).await.is_empty());
    }
}

#[cfg(test)]
mod batching {

    use serde_json::json;

    use super::*;
    use crate::TaskStatus;

    /// What 32 workers and 32 clients do to the store at once: create tasks, mark them running,
    /// append events, finish them, read them. No write fails (the probe saw `database is
    /// locked`, SQLITE_BUSY_SNAPSHOT, from deferred transactions on a pool of writers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_task_lifecycles_never_fail_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        store.create_session("s", "d").await.unwrap();
        let control = Arc::new(Control::new(
            Arc::new(store),
            "node",
            Arc::new(Notifier::local("node")),
        ));
        let mut workers = Vec::new();
        for w in 0..32 {
            let control = Arc::clone(&control);
            workers.push(tokio::spawn(async move {
                for n in 0..40 {
                    let task = TaskInfo {
                        id: format!("t{w}-{n}"),
                        deployment: "d".into(),
                        service: "svc".into(),
                        session_id: "s".into(),
                        input: json!({}),
                        status: TaskStatus::Queued,
                        attempt: 1,
                        result: None,
                        error: None,
                    };
                    let store = control.store();
                    store.insert_task(&task).await?;
                    store
                        .set_task_status(&task.id, TaskStatus::Running, 1)
                        .await?;
                    for e in 0..3 {
                        control.event(&task.id, 1, json!(e)).await?;
                    }
                    control
                        .finish(&task, Ok(json!(n)), Some(json!({"n": n})))
                        .await?;
                    store.task(&task.id).await?;
                    store.tasks_page("d", None, 10).await?;
                }
                Ok::<_, Error>(())
            }));
        }
        for worker in workers {
            worker.await.unwrap().unwrap();
        }
        let tasks = control.store().tasks("d").await.unwrap();
        assert_eq!(tasks.len(), 32 * 40);
        assert!(tasks.iter().all(|t| t.status == TaskStatus::Succeeded));
        assert_eq!(
            control.failed_commits(),
            0,
            "a commit of the task log failed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_transactions_and_keep_each_log_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        let control = Arc::new(Control::new(
            Arc::new(store),
            "node",
            Arc::new(Notifier::local("node")),
        ));
        const TASKS: usize = 50;
        const EVENTS: usize = 20;
        let mut writers = Vec::new();
        for t in 0..TASKS {
            let control = Arc::clone(&control);
            writers.push(tokio::spawn(async move {
                let id = format!("t{t}");
                let task = TaskInfo {
                    id: id.clone(),
                    deployment: "d".into(),
                    service: "svc".into(),
                    session_id: format!("s{t}"),
                    input: json!({}),
                    status: TaskStatus::Queued,
                    attempt: 0,
                    result: None,
                    error: None,
                };
                control
                    .create(&task, true)
                    .await
                    .unwrap()
                    .done()
                    .await
                    .unwrap();
                for n in 0..EVENTS {
                    control.event(&id, 1, json!(n)).await.unwrap();
                }
                // Events are not waited for; the outcome, queued after them, is.
                control.finish(&task, Ok(json!("end")), None).await.unwrap();
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let writes = (TASKS * EVENTS) as u64;
        assert!(
            control.commits() < writes,
            "{} transactions for {writes} writes: nothing was batched",
            control.commits()
        );
        for t in 0..TASKS {
            let events = control
                .store()
                .events_after(&format!("t{t}"), 0)
                .await
                .unwrap()
                .expect("the task exists");
            let seen: Vec<_> = events.iter().map(|e| (e.seq, e.data.clone())).collect();
            let mut expected: Vec<_> = (0..EVENTS).map(|n| (n as u64 + 1, json!(n))).collect();
            expected.push((EVENTS as u64 + 1, json!("end")));
            assert_eq!(seen, expected);
        }
    }
}
