//! The builder, the running pipeline and its input handle.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use futures::{FutureExt, Stream};
use tokio::task::JoinSet;

use crate::budget::{Budget, BudgetGate};
use crate::drivers::{Step, run_batches, run_items, run_iter_source, run_source};
use crate::error::{BoxError, Closed, Error, Failed, panic_message};
use crate::item::{Meta, MetaBox, Queue};
use crate::link::{CloseGuard, Fill, Link, Receiver};
use crate::progress::{PipelineState, Progress, Shared, StageCounters, StageState, TrackGate};
use crate::stage::{BatchConfig, Concurrency, Ctx, Input, Output, Stage, urgent_meta};

/// The capacity of the links between stages unless [`Pipeline::capacity`] says otherwise.
pub const DEFAULT_CAPACITY: usize = 64;

type StageFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// A pipeline being built: an input, then typed stages joined by bounded links. `T` is the
/// type of what comes out of its last stage.
///
/// Nothing runs until [`run`](Pipeline::run), [`collect`](Pipeline::collect) or
/// [`into_stream`](Pipeline::into_stream); each stage then runs as a tokio task, and the
/// returned future (or stream) owns them all: the first error cancels every stage and is
/// returned once all of them are gone, and dropping the future cancels them too.
#[must_use = "a pipeline does nothing until it is run"]
pub struct Pipeline<T> {
    shared: Arc<Shared>,
    tasks: Vec<StageFuture>,
    /// The link at the end of the pipeline so far; its receiving end goes to the next stage.
    tail: Receiver<T>,
    capacity: usize,
    unstarted: Unstarted,
}

impl<T> fmt::Debug for Pipeline<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("tasks", &self.tasks.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Marks the pipeline cancelled if the builder is dropped without being run.
struct Unstarted(Option<Arc<Shared>>);

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.set_state_unless_final(PipelineState::Cancelled);
        }
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline whose input is `stream`; it ends when the stream does.
    pub fn from_stream<S>(stream: S) -> Self
    where
        S: Stream<Item = T> + Send + 'static,
    {
        Pipeline::from_source(move |output| run_source(stream, output))
    }

    /// A pipeline whose input is `items`, taken lazily a chunk at a time; it ends when the
    /// iterator does. The iterator runs on the runtime's threads, so it must not block (read
    /// a file or a socket through [`from_stream`](Pipeline::from_stream) instead).
    /// `Pipeline::from_iter` (the [`FromIterator`] impl) collects the items first.
    pub fn from_items<I>(items: I) -> Self
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        let items = items.into_iter();
        Pipeline::from_source(move |output| run_iter_source(items, output))
    }

    fn from_source<F, Fut>(source: F) -> Self
    where
        F: FnOnce(Output<T>) -> Fut,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let shared = Shared::new();
        let link = Link::new(DEFAULT_CAPACITY, 1);
        let counters = shared.add_stage(Arc::from("source"), false);
        let ctx = Ctx {
            counters,
            shared: Arc::clone(&shared),
        };
        let output = Output::new(Arc::clone(&link), ctx.clone());
        let task = stage_task(ctx, CloseGuard::new(Arc::clone(&link)), source(output));
        Pipeline {
            unstarted: Unstarted(Some(Arc::clone(&shared))),
            shared,
            tasks: vec![task],
            tail: Receiver { link },
            capacity: DEFAULT_CAPACITY,
        }
    }

    /// A pipeline fed through a [`Feeder`] (cloneable, for any number of producers); it ends
    /// when every clone of the feeder is dropped. Items put before the pipeline runs wait in
    /// its first link (up to its capacity).
    pub fn channel() -> (Feeder<T>, Self) {
        let shared = Shared::new();
        let link = Link::new(DEFAULT_CAPACITY, 1);
        let feeder = Feeder {
            link: Arc::clone(&link),
        };
        let pipeline = Pipeline {
            unstarted: Unstarted(Some(Arc::clone(&shared))),
            shared,
            tasks: Vec::new(),
            tail: Receiver { link },
            capacity: DEFAULT_CAPACITY,
        };
        (feeder, pipeline)
    }

    /// Sets how many items the link at the end of the pipeline so far, and every link added
    /// after it, holds (at least 1). A link counts what is queued and what the next stage has
    /// taken and not yet passed on; a full link makes `put` wait. (A stage gathering a batch
    /// gives back the room of the items in it early, and a concurrent stage that of the items
    /// it has started, so each may hold up to one batch, or `concurrency` items, more.)
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self.tail.link.set_capacity(self.capacity);
        self
    }

    /// Bounds what is in flight from here to the end of the pipeline by `budget`: each item
    /// takes one item and `weigh(item)` bytes before it enters the next stage, and gives them
    /// back when it leaves the pipeline or is dropped. One budget per point of a pipeline; a
    /// second call at the same point is ignored. Attach it before feeding a [`Feeder`].
    pub fn budget(
        self,
        budget: &Budget,
        weigh: impl Fn(&T) -> usize + Send + Sync + 'static,
    ) -> Self {
        let gate = BudgetGate {
            budget: budget.clone(),
            weigh: Box::new(weigh),
        };
        if self.tail.link.budget.set(gate).is_err() {
            tracing::debug!("a second budget at the same point of a pipeline is ignored");
        }
        self
    }

    /// Tracks every item from here on, labelled by `label`: [`Progress::snapshot`] then shows
    /// for each item the stage it is in and whether it waits, runs, is done or failed.
    pub fn track(self, label: impl Fn(&T) -> String + Send + Sync + 'static) -> Self {
        let gate = TrackGate {
            label: Box::new(label),
        };
        if self.tail.link.track.set(gate).is_err() {
            tracing::debug!("a second tracking at the same point of a pipeline is ignored");
        }
        self
    }

    /// A handle on the progress of the pipeline, readable while it runs.
    pub fn progress(&self) -> Progress {
        Progress {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Adds a stage of your own (see [`Stage`]).
    pub fn custom_stage<U, S>(mut self, name: &str, stage: S) -> Pipeline<U>
    where
        U: Send + 'static,
        S: Stage<T, U>,
    {
        let name: Arc<str> = Arc::from(name);
        // The consumer is set once, when the stage that reads a link is added.
        let _ = self.tail.link.consumer.set(Arc::clone(&name));
        let counters: Arc<StageCounters> = self.shared.add_stage(name, true);
        let ctx = Ctx {
            counters,
            shared: Arc::clone(&self.shared),
        };
        let next = Link::new(self.capacity, 1);
        let input = Input::new(self.tail, ctx.clone());
        let output = Output::new(Arc::clone(&next), ctx.clone());
        let guard = CloseGuard::new(Arc::clone(&next));
        self.tasks
            .push(stage_task(ctx, guard, stage.run(input, output)));
        Pipeline {
            shared: self.shared,
            tasks: self.tasks,
            tail: Receiver { link: next },
            capacity: self.capacity,
            unstarted: self.unstarted,
        }
    }

    /// Adds a stage that maps every item with `f`, up to `concurrency` at once.
    pub fn map<U, F, Fut>(
        self,
        name: &str,
        concurrency: impl Into<Concurrency>,
        mut f: F,
    ) -> Pipeline<U>
    where
        U: Send + 'static,
        F: FnMut(T) -> Fut + Send + 'static,
        Fut: Future<Output = U> + Send + 'static,
    {
        let concurrency = concurrency.into();
        self.custom_stage(name, move |input, output| {
            run_items(
                input,
                output,
                concurrency,
                move |value| Either::<Fut, U>::Left(f(value)),
                Step::Out,
            )
        })
    }

    /// Adds a stage that maps every item with `f`, up to `concurrency` at once; the first
    /// `Err` fails the pipeline (fail-fast: every stage is cancelled, the error returned).
    pub fn stage<U, E, F, Fut>(
        self,
        name: &str,
        concurrency: impl Into<Concurrency>,
        mut f: F,
    ) -> Pipeline<U>
    where
        U: Send + 'static,
        E: Into<BoxError> + Send + 'static,
        F: FnMut(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
    {
        let concurrency = concurrency.into();
        self.custom_stage(name, move |input, output| {
            run_items(
                input,
                output,
                concurrency,
                move |value| Either::<Fut, U>::Left(f(value)),
                |result: Result<U, E>| match result {
                    Ok(value) => Step::Out(value),
                    Err(error) => Step::Fatal(error.into()),
                },
            )
        })
    }

    /// Adds a stage whose errors fail one item, not the pipeline: an `Err` of `f` is passed on
    /// as `Err(Failed { stage, error })`, counted as failed, and shown failed in the per-item
    /// progress. Continue with [`and_then`](Pipeline::and_then).
    pub fn try_stage<U, E, F, Fut>(
        self,
        name: &str,
        concurrency: impl Into<Concurrency>,
        mut f: F,
    ) -> Pipeline<Result<U, Failed<E>>>
    where
        U: Send + 'static,
        E: fmt::Display + Send + 'static,
        F: FnMut(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
    {
        let concurrency = concurrency.into();
        let stage = name.to_owned();
        self.custom_stage(name, move |input, output| {
            run_items(
                input,
                output,
                concurrency,
                move |value| Either::<Fut, Result<U, Failed<E>>>::Left(f(value)),
                move |result| item_step(&stage, result),
            )
        })
    }

    /// Adds a stage that consumes batches (see [`Input::next_batch`] for when one is
    /// released) and returns the outputs of each; the first `Err` fails the pipeline. When `f`
    /// returns as many outputs as it got items, output `i` carries what travelled with item
    /// `i` (budget permit, tracking, urgency); otherwise those are released with the batch.
    pub fn batched_stage<U, E, F, Fut>(self, name: &str, config: BatchConfig, f: F) -> Pipeline<U>
    where
        U: Send + 'static,
        E: Into<BoxError> + Send + 'static,
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<U>, E>> + Send + 'static,
    {
        self.custom_stage(name, move |input, output| {
            run_batches(input, output, config, f)
        })
    }

    /// Runs the pipeline: its output, then at most one error (the first), then the end.
    /// Dropping the stream cancels every stage.
    pub fn into_stream(mut self) -> Outputs<T> {
        self.unstarted.0 = None;
        Outputs {
            unstarted: self.tasks,
            started: false,
            set: JoinSet::new(),
            rx: self.tail,
            local: Queue::default(),
            exit_closed: false,
            error: None,
            done: false,
            shared: self.shared,
        }
    }

    /// Runs the pipeline and drops its output (the last stage drops what it puts, releasing
    /// budget permits there); returns the first error, once every stage is gone. Dropping the
    /// future cancels every stage.
    pub async fn run(self) -> Result<(), Error> {
        // The last stage drops what it puts, rather than handing it over to be dropped here.
        self.tail.link.discard();
        let mut outputs = self.into_stream();
        poll_fn(|cx| match outputs.poll_step(cx, true) {
            Poll::Ready(Some(Err(error))) => Poll::Ready(Err(error)),
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        })
        .await
    }

    /// Runs the pipeline and returns its output; see [`run`](Pipeline::run).
    pub async fn collect(self) -> Result<Vec<T>, Error> {
        let mut outputs = self.into_stream();
        let mut all = Vec::new();
        loop {
            match poll_fn(|cx| outputs.poll_step(cx, false)).await {
                Some(Ok(value)) => all.push(value),
                Some(Err(error)) => return Err(error),
                None => return Ok(all),
            }
        }
    }
}

impl<T, E> Pipeline<Result<T, Failed<E>>>
where
    T: Send + 'static,
    E: fmt::Display + Send + 'static,
{
    /// Adds a stage that runs `f` on the items that have not failed, and passes the failed
    /// ones through untouched; an `Err` of `f` fails that item only (see
    /// [`try_stage`](Pipeline::try_stage)).
    pub fn and_then<U, F, Fut>(
        self,
        name: &str,
        concurrency: impl Into<Concurrency>,
        mut f: F,
    ) -> Pipeline<Result<U, Failed<E>>>
    where
        U: Send + 'static,
        F: FnMut(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
    {
        let concurrency = concurrency.into();
        let stage = name.to_owned();
        self.custom_stage(name, move |input, output| {
            run_items(
                input,
                output,
                concurrency,
                move |item: Result<T, Failed<E>>| match item {
                    Ok(value) => Either::Left(f(value)),
                    Err(failed) => Either::Right(Err(failed)),
                },
                move |result| item_step(&stage, result),
            )
        })
    }
}

impl<T: Send + 'static> FromIterator<T> for Pipeline<T> {
    /// A pipeline whose input is the items, collected first (an iterator that is `Send` can
    /// go to [`Pipeline::from_items`] as it is, and is then read lazily).
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let items: Vec<T> = items.into_iter().collect();
        Pipeline::from_items(items)
    }
}

fn item_step<U, E: fmt::Display>(stage: &str, result: Result<U, E>) -> Step<Result<U, Failed<E>>> {
    match result {
        Ok(value) => Step::Out(Ok(value)),
        Err(error) => {
            let text = error.to_string();
            let failed = Failed {
                stage: stage.to_owned(),
                error,
            };
            Step::Failed(Err(failed), text)
        }
    }
}

/// Wraps a stage's work into its task: records its start and end, closes its output link
/// cleanly on success (aborts it otherwise), and turns an error or a panic into [`Error`].
fn stage_task<U: Send + 'static>(
    ctx: Ctx,
    guard: CloseGuard<U>,
    work: impl Future<Output = Result<(), BoxError>> + Send + 'static,
) -> StageFuture {
    Box::pin(async move {
        let counters = Arc::clone(&ctx.counters);
        let _cancelled = MarkCancelled(Arc::clone(&counters));
        counters.start();
        let stage = || counters.name.to_string();
        match AssertUnwindSafe(work).catch_unwind().await {
            Ok(Ok(())) => {
                guard.finish();
                counters.end(StageState::Finished);
                Ok(())
            }
            Ok(Err(error)) if error.is::<Closed>() => {
                // The next stage stopped reading: a normal end for this one.
                guard.finish();
                counters.end(StageState::Finished);
                Ok(())
            }
            Ok(Err(source)) => {
                counters.end(StageState::Failed);
                Err(Error::Stage {
                    stage: stage(),
                    source,
                })
            }
            Err(payload) => {
                counters.end(StageState::Failed);
                Err(Error::Panicked {
                    stage: stage(),
                    message: panic_message(&*payload),
                })
            }
        }
    })
}

/// Records a stage dropped while running (its task aborted) as cancelled.
struct MarkCancelled(Arc<StageCounters>);

impl Drop for MarkCancelled {
    fn drop(&mut self) {
        self.0.end(StageState::Cancelled);
    }
}

/// Counts a stage task as alive from its spawn until its future is dropped.
struct LiveTask(Arc<Shared>);

impl LiveTask {
    fn new(shared: &Arc<Shared>) -> Self {
        shared
            .live_tasks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        LiveTask(Arc::clone(shared))
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.0
            .live_tasks
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A running pipeline: a stream of its output, then at most one error, then the end.
///
/// The stream owns the stage tasks (started on its first poll). The first error aborts every
/// stage, waits until each is gone, and is then yielded; no output is yielded after an error
/// is known. Dropping the stream aborts every stage (a task being polled on another thread
/// stops at its next await point).
pub struct Outputs<T> {
    unstarted: Vec<StageFuture>,
    started: bool,
    set: JoinSet<Result<(), Error>>,
    rx: Receiver<T>,
    local: Queue<T>,
    exit_closed: bool,
    error: Option<Error>,
    done: bool,
    shared: Arc<Shared>,
}

impl<T> fmt::Debug for Outputs<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outputs")
            .field("running", &self.set.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<T> Unpin for Outputs<T> {}

impl<T: Send + 'static> Outputs<T> {
    /// A handle on the progress of the pipeline.
    pub fn progress(&self) -> Progress {
        Progress {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Cancels the pipeline: aborts every stage task and waits until each one is gone.
    /// (Dropping the stream aborts them too, but cannot wait.)
    pub async fn cancel(mut self) {
        self.unstarted.clear();
        self.set.abort_all();
        while self.set.join_next().await.is_some() {}
        self.done = true;
        self.shared.set_state_unless_final(PipelineState::Cancelled);
    }

    fn start(&mut self) -> Result<(), Error> {
        self.started = true;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        self.shared.set_state(PipelineState::Running);
        for task in self.unstarted.drain(..) {
            let live = LiveTask::new(&self.shared);
            self.set.spawn(async move {
                let _live = live;
                task.await
            });
        }
        Ok(())
    }

    fn fail(&mut self, error: Error) {
        if self.error.is_none() {
            tracing::debug!(error = %error_chain(&error), "pipeline failed, cancelling its stages");
            self.error = Some(error);
            self.set.abort_all();
        }
    }

    /// One step of the stream; with `discard`, output is dropped a chunk at a time.
    fn poll_step(&mut self, cx: &mut Context<'_>, discard: bool) -> Poll<Option<Result<T, Error>>> {
        if !self.started
            && let Err(error) = self.start()
        {
            self.done = true;
            self.shared.set_state(PipelineState::Failed {
                error: error.to_string(),
            });
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            // Reap the stages that ended; the first error starts the cancellation.
            while let Poll::Ready(Some(joined)) = self.set.poll_join_next(cx) {
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => self.fail(error),
                    Err(join_error) if join_error.is_cancelled() => {}
                    Err(join_error) => {
                        let message = match join_error.try_into_panic() {
                            Ok(payload) => panic_message(&*payload),
                            Err(other) => other.to_string(),
                        };
                        self.fail(Error::Panicked {
                            stage: "unknown".to_owned(),
                            message,
                        });
                    }
                }
            }
            if let Some(error) = self.error.take() {
                if !self.set.is_empty() {
                    // Waiting for the cancelled stages to be gone; the set will wake us.
                    self.error = Some(error);
                    return Poll::Pending;
                }
                self.done = true;
                self.local = Queue::default();
                self.shared.set_state(PipelineState::Failed {
                    error: error_chain(&error),
                });
                return Poll::Ready(Some(Err(error)));
            }
            if discard {
                self.local = Queue::default();
            } else if let Some((value, meta)) = self.local.pop() {
                drop::<MetaBox>(meta);
                return Poll::Ready(Some(Ok(value)));
            }
            if self.exit_closed {
                if self.set.is_empty() {
                    self.done = true;
                    self.shared.set_state(PipelineState::Finished);
                    return Poll::Ready(None);
                }
                // The last stages are returning; the set will wake us.
                return Poll::Pending;
            }
            match self.rx.link.poll_fill(cx, &mut self.local) {
                Poll::Ready(Fill::Closed) => self.exit_closed = true,
                Poll::Ready(_) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: Send + 'static> Stream for Outputs<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_step(cx, false)
    }
}

impl<T: Send + 'static> futures::stream::FusedStream for Outputs<T> {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl<T> Drop for Outputs<T> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.set_state_unless_final(PipelineState::Cancelled);
        }
        // Dropping `set` aborts every stage task.
    }
}

/// An error and its sources, as one line.
fn error_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The input of a pipeline made with [`Pipeline::channel`]. Cheap to clone; the input ends
/// when every clone is dropped.
pub struct Feeder<T> {
    link: Arc<Link<T>>,
}

impl<T> fmt::Debug for Feeder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feeder").finish_non_exhaustive()
    }
}

impl<T> Clone for Feeder<T> {
    fn clone(&self) -> Self {
        self.link.add_sender();
        Feeder {
            link: Arc::clone(&self.link),
        }
    }
}

impl<T> Drop for Feeder<T> {
    fn drop(&mut self) {
        self.link.close_sender(true);
    }
}

impl<T: Send + 'static> Feeder<T> {
    /// Puts `value` into the pipeline; waits for room (and for the budget, if any).
    /// Fails once the pipeline stopped reading (it failed, or was dropped). Cancelled while
    /// it waits, the value is dropped.
    pub async fn put(&self, value: T) -> Result<(), Closed> {
        self.send(value, None).await
    }

    /// Puts `value` as an urgent item: the batch it lands in is released at once.
    pub async fn put_urgent(&self, value: T) -> Result<(), Closed> {
        self.send(value, Some(Box::new(urgent_meta()))).await
    }

    /// Asks the first stage to release the batch it is gathering once it has what was put
    /// before this call.
    pub fn flush(&self) {
        self.link.signal_flush();
    }

    /// Whether the pipeline stopped reading (every `put` would fail).
    pub fn is_closed(&self) -> bool {
        self.link.is_rx_closed()
    }

    async fn send(&self, value: T, mut meta: MetaBox) -> Result<(), Closed> {
        if let Some(gate) = self.link.budget.get() {
            let weight = (gate.weigh)(&value);
            let permit = match gate.budget.try_acquire(weight) {
                Some(permit) => permit,
                None => gate.budget.acquire(weight).await,
            };
            meta.get_or_insert_with(Box::<Meta>::default)
                .permits
                .push(permit);
        }
        let mut slot = Some((value, meta));
        poll_fn(|cx| self.link.poll_send_one(cx, &mut slot)).await
    }
}
