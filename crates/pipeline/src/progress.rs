//! What a pipeline reports while it runs: per stage, items in, out and failed and where the
//! time went; per tracked item, which stage it is in.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where a pipeline is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PipelineState {
    /// Built, not run yet.
    NotStarted,
    /// Its stages run.
    Running,
    /// Every stage finished and the output stream ended.
    Finished,
    /// A stage failed; every stage was cancelled.
    Failed {
        /// The error, as text.
        error: String,
    },
    /// The pipeline (its future, its output stream, or the unstarted builder) was dropped.
    Cancelled,
}

impl PipelineState {
    /// Whether the pipeline is over: finished, failed or cancelled.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            PipelineState::Finished | PipelineState::Failed { .. } | PipelineState::Cancelled
        )
    }
}

/// Where a stage is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StageState {
    /// Not started yet.
    NotStarted,
    /// Running.
    Running,
    /// Finished after its input ended.
    Finished,
    /// Returned an error or panicked.
    Failed,
    /// Cancelled, because another stage failed or the pipeline was dropped.
    Cancelled,
}

impl StageState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => StageState::Running,
            2 => StageState::Finished,
            3 => StageState::Failed,
            4 => StageState::Cancelled,
            _ => StageState::NotStarted,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            StageState::NotStarted => 0,
            StageState::Running => 1,
            StageState::Finished => 2,
            StageState::Failed => 3,
            StageState::Cancelled => 4,
        }
    }
}

/// One stage's counters at the time of a [`Snapshot`].
///
/// `items_in` counts the items the stage took from its input, `items_out` those it passed on,
/// `items_failed` those it failed (passed on as values by `try_stage`/`and_then`, or the one
/// that failed the pipeline); `items_in - items_out - items_failed` are in the stage.
/// `busy` is the time the stage ran, not counting `waiting_for_input` (its input was empty) and
/// `waiting_for_output` (the next stage was full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageProgress {
    /// The stage's name.
    pub name: String,
    /// Where the stage is in its life.
    pub state: StageState,
    /// Items taken from the input.
    pub items_in: u64,
    /// Items passed on.
    pub items_out: u64,
    /// Items that failed in this stage.
    pub items_failed: u64,
    /// Time spent working.
    pub busy: Duration,
    /// Time spent waiting for input.
    pub waiting_for_input: Duration,
    /// Time spent waiting for room in the next stage's input.
    pub waiting_for_output: Duration,
}

impl StageProgress {
    /// Items in the stage now: taken and neither passed on nor failed.
    pub fn in_progress(&self) -> u64 {
        self.items_in
            .saturating_sub(self.items_out)
            .saturating_sub(self.items_failed)
    }
}

/// Where a tracked item is (see [`Pipeline::track`](crate::Pipeline::track)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ItemState {
    /// Queued for its stage.
    Waiting,
    /// Being processed by its stage.
    Running,
    /// Through the last stage.
    Done,
    /// Failed in its stage; it stays so even when later stages pass it on as a value.
    Failed {
        /// The error, as text.
        error: String,
    },
}

/// One tracked item at the time of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemProgress {
    /// The item's label, as the `track` function gave it.
    pub label: String,
    /// The stage the item is in, waits for, failed in, or (when done) went through last.
    pub stage: String,
    /// What it is doing there.
    pub state: ItemState,
}

/// The progress of a pipeline at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The pipeline's state.
    pub state: PipelineState,
    /// Every stage, in pipeline order.
    pub stages: Vec<StageProgress>,
    /// Every tracked item, in the order the first tracking stage saw them.
    pub items: Vec<ItemProgress>,
}

impl Snapshot {
    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageProgress> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The first tracked item labelled `label`.
    pub fn item(&self, label: &str) -> Option<&ItemProgress> {
        self.items.iter().find(|i| i.label == label)
    }
}

/// A handle on a pipeline's progress, readable before, while and after it runs. Cheap to
/// clone; it does not keep the pipeline running.
#[derive(Clone)]
pub struct Progress {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Every stage's counters and every tracked item, now.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// The pipeline's state, now.
    pub fn state(&self) -> PipelineState {
        self.shared.state.borrow().clone()
    }

    /// Stage tasks alive now (spawned and not yet completed or dropped). Zero once the
    /// pipeline's future has returned.
    pub fn running_tasks(&self) -> usize {
        self.shared.live_tasks.load(Ordering::SeqCst)
    }

    /// Waits until the pipeline is over, and returns how it ended.
    pub async fn finished(&self) -> PipelineState {
        let mut rx = self.shared.state.subscribe();
        // The sender lives in `shared`, which `self` holds: `wait_for` cannot fail.
        match rx.wait_for(PipelineState::is_final).await {
            Ok(state) => state.clone(),
            Err(_) => self.state(),
        }
    }

    /// A snapshot now, then one every `every` while the pipeline runs, and a last one as soon
    /// as it is over; then the stream ends.
    pub fn updates(&self, every: Duration) -> impl Stream<Item = Snapshot> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let rx = shared.state.subscribe();
        futures::stream::unfold(Some((shared, rx, true)), move |state| async move {
            let (shared, mut rx, first) = state?;
            if !first && !rx.borrow().is_final() {
                let over = async {
                    let _ = rx.wait_for(PipelineState::is_final).await;
                };
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = over => {}
                }
            }
            let snapshot = shared.snapshot();
            let next = (!snapshot.state.is_final()).then_some((shared, rx, false));
            Some((snapshot, next))
        })
    }
}

/// State shared by a pipeline's stages, its runner and its `Progress` handles.
pub(crate) struct Shared {
    epoch: Instant,
    stages: Mutex<Vec<Arc<StageCounters>>>,
    items: Mutex<Vec<ItemRecord>>,
    pub(crate) live_tasks: AtomicUsize,
    state: watch::Sender<PipelineState>,
}

struct ItemRecord {
    label: String,
    stage: Arc<str>,
    state: ItemState,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            epoch: Instant::now(),
            stages: Mutex::new(Vec::new()),
            items: Mutex::new(Vec::new()),
            live_tasks: AtomicUsize::new(0),
            state: watch::Sender::new(PipelineState::NotStarted),
        })
    }

    /// Counters for a new stage; `listed` stages appear in snapshots.
    pub(crate) fn add_stage(&self, name: Arc<str>, listed: bool) -> Arc<StageCounters> {
        let counters = Arc::new(StageCounters {
            name,
            epoch: self.epoch,
            items_in: AtomicU64::new(0),
            items_out: AtomicU64::new(0),
            items_failed: AtomicU64::new(0),
            wait_input: AtomicU64::new(0),
            wait_output: AtomicU64::new(0),
            wait_input_since: AtomicU64::new(0),
            wait_output_since: AtomicU64::new(0),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            state: AtomicU8::new(0),
        });
        if listed {
            lock(&self.stages).push(Arc::clone(&counters));
        }
        counters
    }

    pub(crate) fn set_state(&self, state: PipelineState) {
        self.state.send_replace(state);
    }

    /// Sets the state unless the pipeline is already over.
    pub(crate) fn set_state_unless_final(&self, state: PipelineState) {
        self.state.send_if_modified(|s| {
            if s.is_final() {
                false
            } else {
                *s = state;
                true
            }
        });
    }

    pub(crate) fn register_item(&self, label: String, stage: &Arc<str>) -> usize {
        let mut items = lock(&self.items);
        items.push(ItemRecord {
            label,
            stage: Arc::clone(stage),
            state: ItemState::Waiting,
        });
        items.len() - 1
    }

    /// Moves a tracked item; a failed item stays failed.
    pub(crate) fn set_item(&self, id: usize, stage: &Arc<str>, state: ItemState) {
        let mut items = lock(&self.items);
        if let Some(item) = items.get_mut(id)
            && !matches!(item.state, ItemState::Failed { .. })
        {
            if !Arc::ptr_eq(&item.stage, stage) {
                item.stage = Arc::clone(stage);
            }
            item.state = state;
        }
    }

    fn snapshot(&self) -> Snapshot {
        let state = self.state.borrow().clone();
        let stages = lock(&self.stages).iter().map(|c| c.progress()).collect();
        let items = lock(&self.items)
            .iter()
            .map(|i| ItemProgress {
                label: i.label.clone(),
                stage: i.stage.to_string(),
                state: i.state.clone(),
            })
            .collect();
        Snapshot {
            state,
            stages,
            items,
        }
    }
}

/// One stage's counters. Each is written by the stage's own task only, a chunk of items at a
/// time, so the stages never contend on them.
pub(crate) struct StageCounters {
    pub(crate) name: Arc<str>,
    epoch: Instant,
    items_in: AtomicU64,
    items_out: AtomicU64,
    items_failed: AtomicU64,
    /// Nanoseconds waited, finished waits only.
    wait_input: AtomicU64,
    wait_output: AtomicU64,
    /// Start of the current wait, in nanoseconds since the epoch plus one; zero: not waiting.
    wait_input_since: AtomicU64,
    wait_output_since: AtomicU64,
    started: AtomicU64,
    ended: AtomicU64,
    state: AtomicU8,
}

/// Which of a stage's waits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    Input,
    Output,
}

impl StageCounters {
    fn now(&self) -> u64 {
        let nanos = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1
    }

    pub(crate) fn add_in(&self, n: usize) {
        self.items_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_out(&self, n: u64) {
        self.items_out.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_failed(&self, n: u64) {
        self.items_failed.fetch_add(n, Ordering::Relaxed);
    }

    fn wait_slots(&self, wait: Wait) -> (&AtomicU64, &AtomicU64) {
        match wait {
            Wait::Input => (&self.wait_input, &self.wait_input_since),
            Wait::Output => (&self.wait_output, &self.wait_output_since),
        }
    }

    pub(crate) fn begin_wait(&self, wait: Wait) {
        let (_, since) = self.wait_slots(wait);
        if since.load(Ordering::Relaxed) == 0 {
            since.store(self.now(), Ordering::Relaxed);
        }
    }

    pub(crate) fn end_wait(&self, wait: Wait) {
        let (total, since) = self.wait_slots(wait);
        let start = since.swap(0, Ordering::Relaxed);
        if start != 0 {
            total.fetch_add(self.now().saturating_sub(start), Ordering::Relaxed);
        }
    }

    pub(crate) fn start(&self) {
        self.started.store(self.now(), Ordering::Relaxed);
        self.state
            .store(StageState::Running.as_u8(), Ordering::Relaxed);
    }

    /// Records the end of the stage, unless it already ended.
    pub(crate) fn end(&self, state: StageState) {
        let running = StageState::Running.as_u8();
        if self
            .state
            .compare_exchange(running, state.as_u8(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.end_wait(Wait::Input);
            self.end_wait(Wait::Output);
            self.ended.store(self.now(), Ordering::Relaxed);
        }
    }

    fn progress(&self) -> StageProgress {
        let now = self.now();
        let started = self.started.load(Ordering::Relaxed);
        let ended = self.ended.load(Ordering::Relaxed);
        let waited = |total: &AtomicU64, since: &AtomicU64| {
            let since = since.load(Ordering::Relaxed);
            let current = if since == 0 {
                0
            } else {
                now.saturating_sub(since)
            };
            total.load(Ordering::Relaxed) + current
        };
        let wait_input = waited(&self.wait_input, &self.wait_input_since);
        let wait_output = waited(&self.wait_output, &self.wait_output_since);
        let elapsed = match (started, ended) {
            (0, _) => 0,
            (s, 0) => now.saturating_sub(s),
            (s, e) => e.saturating_sub(s),
        };
        StageProgress {
            name: self.name.to_string(),
            state: StageState::from_u8(self.state.load(Ordering::Relaxed)),
            items_in: self.items_in.load(Ordering::Relaxed),
            items_out: self.items_out.load(Ordering::Relaxed),
            items_failed: self.items_failed.load(Ordering::Relaxed),
            busy: Duration::from_nanos(elapsed.saturating_sub(wait_input + wait_output)),
            waiting_for_input: Duration::from_nanos(wait_input),
            waiting_for_output: Duration::from_nanos(wait_output),
        }
    }
}

/// Per-item tracking attached to a link, with the way to label the items read from it.
pub(crate) struct TrackGate<T> {
    pub(crate) label: Box<dyn Fn(&T) -> String + Send + Sync>,
}
