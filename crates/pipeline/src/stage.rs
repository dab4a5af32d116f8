//! A stage's view of the pipeline: the [`Stage`] trait, its [`Input`] and its [`Output`].

use std::future::{Future, poll_fn};
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use tokio::time::{Instant, Sleep};

use crate::error::{BoxError, Closed};
use crate::item::{Batch, Chunk, Item, Meta, MetaBox, Queue, track_id};
use crate::link::{Fill, Link, Receiver};
use crate::progress::{ItemState, Shared, StageCounters, Wait};

/// A step of a pipeline: reads items of type `In` from its [`Input`], passes items of type
/// `Out` on with [`Output::put`], and returns when its input has ended (or earlier, if it
/// wants no more). Returning an error fails the whole pipeline.
///
/// Closures `FnOnce(Input<In>, Output<Out>) -> impl Future<Output = Result<(), E>>` are stages;
/// most pipelines need none of this and use the closure stages of
/// [`Pipeline`](crate::Pipeline) (`map`, `stage`, `try_stage`, `and_then`, `batched_stage`).
///
/// ```
/// use deployd_pipeline::{BatchConfig, BoxError, Input, Output, Pipeline, Stage};
/// use std::time::Duration;
///
/// /// Sums its input in batches of up to 10.
/// struct Sums;
///
/// impl Stage<u32, u32> for Sums {
///     async fn run(self, mut input: Input<u32>, mut output: Output<u32>) -> Result<(), BoxError> {
///         let config = BatchConfig::new(1, 10, Duration::from_millis(5));
///         while let Some(batch) = input.next_batch(config).await {
///             output.put(batch.iter().sum()).await?;
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), deployd_pipeline::Error> {
/// let sums = Pipeline::from_iter(1..=100).custom_stage("sum", Sums).collect().await?;
/// assert_eq!(sums.iter().sum::<u32>(), 5050);
/// # Ok(())
/// # }
/// ```
pub trait Stage<In, Out>: Send + 'static {
    /// Runs the stage to the end of its input.
    fn run(
        self,
        input: Input<In>,
        output: Output<Out>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

impl<In, Out, F, Fut, E> Stage<In, Out> for F
where
    In: Send + 'static,
    Out: Send + 'static,
    F: FnOnce(Input<In>, Output<Out>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Into<BoxError>,
{
    async fn run(self, input: Input<In>, output: Output<Out>) -> Result<(), BoxError> {
        self(input, output).await.map_err(Into::into)
    }
}

/// How many items a closure stage works on at once, and in which order it passes them on.
///
/// `usize` converts to [`Concurrency::ordered`], so `pipeline.stage("sync", 4, f)` runs `f` on
/// up to 4 items at once and keeps the input order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    limit: usize,
    order: Order,
}

/// The order a concurrent stage passes its results on in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The order of the input (`buffered`): a slow item holds back those after it.
    Input,
    /// The order items complete in (`buffer_unordered`).
    Completion,
}

impl Concurrency {
    /// Up to `limit` items at once (at least 1), results in input order.
    pub fn ordered(limit: usize) -> Self {
        Concurrency {
            limit: limit.max(1),
            order: Order::Input,
        }
    }

    /// Up to `limit` items at once (at least 1), results in completion order.
    pub fn unordered(limit: usize) -> Self {
        Concurrency {
            limit: limit.max(1),
            order: Order::Completion,
        }
    }

    /// How many items at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// In which order results are passed on.
    pub fn order(&self) -> Order {
        self.order
    }
}

impl From<usize> for Concurrency {
    fn from(limit: usize) -> Self {
        Concurrency::ordered(limit)
    }
}

/// When a batch is released; see [`Input::next_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    min: usize,
    max: usize,
    max_wait: Duration,
}

impl BatchConfig {
    /// Batches of `min` to `max` items, released at the latest `max_wait` after their first
    /// item arrived. `min` is at least 1 and `max` at least `min`.
    pub fn new(min: usize, max: usize, max_wait: Duration) -> Self {
        let min = min.max(1);
        BatchConfig {
            min,
            max: max.max(min),
            max_wait,
        }
    }

    /// The fewest items released without a reason (timeout, end, urgent item, flush).
    pub fn min(&self) -> usize {
        self.min
    }

    /// The most items in a batch.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The longest a batch waits for `min` items after its first item arrived.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }
}

/// A stage's counters and the pipeline it belongs to.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) counters: Arc<StageCounters>,
    pub(crate) shared: Arc<Shared>,
}

impl Ctx {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.counters.name
    }

    pub(crate) fn mark(&self, meta: &MetaBox, state: ItemState) {
        if let Some(id) = track_id(meta) {
            self.shared.set_item(id, self.name(), state);
        }
    }
}

/// What a driver gets from its input next.
pub(crate) enum Next<T> {
    Item(T, MetaBox),
    /// Every item sent before a flush has been handed out.
    Flush,
    End,
}

/// The input of a stage: the items the previous stage put, in order, one at a time or in
/// batches. The end of the stream is the previous stage finishing.
pub struct Input<T> {
    rx: Receiver<T>,
    /// Items taken from the link and not handed out yet.
    local: Queue<T>,
    /// A flush covers the items in `local`.
    local_flush: bool,
    /// Items taken from the link at the last fill whose credit the link has not had back.
    uncredited: usize,
    closed: bool,
    /// The batch being gathered; kept here so `next_batch` can be cancelled without loss.
    batch: Chunk<T>,
    /// When the batch must be released; read from the clock only once the batch has to wait.
    deadline: Option<Instant>,
    /// When the items still in `local` arrived, if they were left over by an earlier batch
    /// (items of the current poll's fill arrived "now").
    leftovers_since: Option<Instant>,
    /// When the batch's first item arrived, if not in the current poll.
    batch_since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    ctx: Ctx,
}

impl<T> std::fmt::Debug for Input<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("stage", self.ctx.name())
            .field("buffered", &self.local.len())
            .field("ended", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Input<T> {
    pub(crate) fn new(rx: Receiver<T>, ctx: Ctx) -> Self {
        Input {
            rx,
            local: Queue::default(),
            local_flush: false,
            uncredited: 0,
            closed: false,
            batch: Chunk::default(),
            deadline: None,
            leftovers_since: None,
            batch_since: None,
            sleep: None,
            waiting: false,
            ctx,
        }
    }

    /// The next value, or `None` at the end of the stream. What travelled with the item (its
    /// budget permit, its tracking) is released; use [`Input::next_item`] to keep it.
    pub async fn next(&mut self) -> Option<T> {
        self.next_item().await.map(Item::into_value)
    }

    /// The next item with what travels with it, or `None` at the end of the stream.
    pub async fn next_item(&mut self) -> Option<Item<T>> {
        loop {
            match poll_fn(|cx| self.poll_next(cx)).await {
                Next::Item(value, meta) => return Some(Item { value, meta }),
                Next::Flush => continue,
                Next::End => return None,
            }
        }
    }

    /// The next batch, or `None` at the end of the stream; never an empty batch.
    ///
    /// A batch takes greedily what is already queued, up to `max` items, and is released as
    /// soon as it has `min` items; otherwise when `max_wait` has passed since its first item
    /// arrived, when the stream ends, when an urgent item joins it
    /// ([`Output::put_urgent`], [`Item::urgent`]), or when the sender flushes
    /// ([`Output::flush`]). Cancel-safe: items gathered for a batch stay in the input.
    pub async fn next_batch(&mut self, config: BatchConfig) -> Option<Batch<T>> {
        poll_fn(|cx| self.poll_next_batch(cx, &config)).await
    }

    /// The batches of [`Input::next_batch`] as a stream.
    pub fn batches(&mut self, config: BatchConfig) -> Batches<'_, T> {
        Batches {
            input: self,
            config,
        }
    }

    /// Takes everything queued on the link. `local` must be empty.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Fill> {
        if self.closed {
            return Poll::Ready(Fill::Closed);
        }
        // Every fill gives the link back the credit of all it had handed out.
        self.uncredited = 0;
        let Poll::Ready(fill) = self.rx.link.poll_fill(cx, &mut self.local) else {
            if !self.waiting {
                self.waiting = true;
                self.ctx.counters.begin_wait(Wait::Input);
            }
            return Poll::Pending;
        };
        if self.waiting {
            self.waiting = false;
            self.ctx.counters.end_wait(Wait::Input);
        }
        match fill {
            Fill::Items { flush } => {
                self.leftovers_since = None;
                self.local_flush |= flush;
                self.uncredited = self.local.len();
                self.ctx.counters.add_in(self.local.len());
                if let Some(gate) = self.rx.link.track.get() {
                    let ctx = &self.ctx;
                    self.local.for_each_meta(|value, meta| {
                        if track_id(meta).is_none() {
                            let id = ctx.shared.register_item((gate.label)(value), ctx.name());
                            meta.get_or_insert_with(Box::default).track = Some(id);
                        }
                    });
                }
            }
            Fill::Flush => self.local_flush = true,
            Fill::Closed => self.closed = true,
        }
        Poll::Ready(fill)
    }

    /// The next item already taken from the link, marked running.
    pub(crate) fn pop_local(&mut self) -> Option<(T, MetaBox)> {
        let (value, meta) = self.local.pop()?;
        self.ctx.mark(&meta, ItemState::Running);
        Some((value, meta))
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next<T>> {
        loop {
            if let Some((value, meta)) = self.pop_local() {
                return Poll::Ready(Next::Item(value, meta));
            }
            if mem::take(&mut self.local_flush) {
                return Poll::Ready(Next::Flush);
            }
            if ready!(self.poll_fill(cx)) == Fill::Closed {
                return Poll::Ready(Next::End);
            }
        }
    }

    /// Gives the link back the room of the items handed out since the last fill: the stage
    /// is done with them when it comes for the next batch.
    fn credit_handed_out(&mut self) {
        if self.local.is_empty() {
            // The fill that comes next gives the link back all it handed out.
            return;
        }
        let handed_out = self
            .uncredited
            .saturating_sub(self.local.len() + self.batch.len());
        // Room goes back in steps of a quarter link (a waiting sender wants half of one).
        if handed_out > 0 && handed_out >= self.rx.link.capacity() / 4 {
            self.uncredited -= handed_out;
            self.rx.link.credit(handed_out);
        }
    }

    fn take_batch(&mut self) -> Batch<T> {
        self.deadline = None;
        self.batch_since = None;
        if !self.local.is_empty() && self.leftovers_since.is_none() {
            // Items stay for a later batch: note when they arrived (they came in this poll).
            self.leftovers_since = Some(Instant::now());
        }
        let batch = mem::take(&mut self.batch);
        for meta in batch.metas() {
            if let Some(id) = meta.track {
                self.ctx
                    .shared
                    .set_item(id, self.ctx.name(), ItemState::Running);
            }
        }
        Batch::from_chunk(batch)
    }

    pub(crate) fn poll_next_batch(
        &mut self,
        cx: &mut Context<'_>,
        config: &BatchConfig,
    ) -> Poll<Option<Batch<T>>> {
        self.credit_handed_out();
        loop {
            while !self.local.is_empty() && self.batch.len() < config.max {
                let Some(chunk) = self.local.pop_chunk(config.max - self.batch.len()) else {
                    break;
                };
                let urgent = chunk.any_urgent();
                if self.batch.is_empty() {
                    self.batch_since = self.leftovers_since;
                }
                self.batch.append_all(chunk);
                if urgent {
                    return Poll::Ready(Some(self.take_batch()));
                }
            }
            if self.batch.len() >= config.max {
                return Poll::Ready(Some(self.take_batch()));
            }
            if mem::take(&mut self.local_flush) && !self.batch.is_empty() {
                return Poll::Ready(Some(self.take_batch()));
            }
            if self.closed {
                return Poll::Ready((!self.batch.is_empty()).then(|| self.take_batch()));
            }
            match self.poll_fill(cx) {
                Poll::Ready(_) => continue,
                Poll::Pending => {}
            }
            // Everything queued is in the batch.
            if self.batch.is_empty() {
                return Poll::Pending;
            }
            if self.batch.len() >= config.min {
                return Poll::Ready(Some(self.take_batch()));
            }
            if self.deadline.is_none() {
                // The first item arrived in this poll (no await since), or with leftovers.
                let since = self.batch_since.unwrap_or_else(Instant::now);
                self.deadline = since.checked_add(config.max_wait);
            }
            let Some(deadline) = self.deadline else {
                // `max_wait` is too long to represent: wait for items only.
                return Poll::Pending;
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            return match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(self.take_batch())),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// The stream of [`Input::batches`].
#[derive(Debug)]
pub struct Batches<'a, T> {
    input: &'a mut Input<T>,
    config: BatchConfig,
}

impl<T: Send + 'static> Stream for Batches<'_, T> {
    type Item = Batch<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch<T>>> {
        let this = self.get_mut();
        this.input.poll_next_batch(cx, &this.config)
    }
}

/// The output of a stage, into the input of the next one (or the output of the pipeline).
///
/// `put` waits while the next stage's input is full: that is the pipeline's backpressure.
/// It fails with [`Closed`] when the next stage no longer reads. A `put` cancelled while it
/// waits (in a `select!`) leaves its item pending: the next `put` or `flush` sends it, and it
/// is dropped if the stage returns without either.
pub struct Output<T> {
    link: Arc<Link<T>>,
    /// Items put and not yet sent.
    pending: Chunk<T>,
    /// Items put and counted as passed on, not yet published to the counters.
    unsent_out: u64,
    /// The size of the last chunk sent whole: room reserved for the next one.
    last_chunk: usize,
    waiting: bool,
    ctx: Ctx,
}

impl<T> std::fmt::Debug for Output<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("stage", self.ctx.name())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Output<T> {
    pub(crate) fn new(link: Arc<Link<T>>, ctx: Ctx) -> Self {
        Output {
            link,
            pending: Chunk::default(),
            unsent_out: 0,
            last_chunk: 0,
            waiting: false,
            ctx,
        }
    }

    /// Passes `value` on; waits while the next stage's input is full.
    pub async fn put(&mut self, value: T) -> Result<(), Closed> {
        self.push(value, None, true).await?;
        self.send().await
    }

    /// Passes `value` on as an urgent item: the batch it lands in is released at once.
    pub async fn put_urgent(&mut self, value: T) -> Result<(), Closed> {
        self.push(value, Some(Box::new(urgent_meta())), true)
            .await?;
        self.send().await
    }

    /// Passes an item on with what travels with it (see [`Item`]).
    pub async fn put_item(&mut self, item: Item<T>) -> Result<(), Closed> {
        self.push(item.value, item.meta, true).await?;
        self.send().await
    }

    /// Passes every value on, in order, sending as many at a time as fit.
    pub async fn put_all(&mut self, values: impl IntoIterator<Item = T>) -> Result<(), Closed> {
        for value in values {
            self.push(value, None, true).await?;
        }
        self.send().await
    }

    /// Passes a batch on, each item with what travels with it.
    pub async fn put_batch(&mut self, batch: Batch<T>) -> Result<(), Closed> {
        let (values, metas) = batch.into_parts();
        self.push_chunk(values, metas).await?;
        self.send().await
    }

    /// Asks the next stage to release the batch it is gathering once it has what was put
    /// before this call, without waiting for `min` items or `max_wait`. Item-at-a-time
    /// closure stages pass flushes on.
    pub async fn flush(&mut self) -> Result<(), Closed> {
        self.send().await?;
        self.link.signal_flush();
        Ok(())
    }

    /// Whether the next stage stopped reading (every `put` would fail).
    pub fn is_closed(&self) -> bool {
        self.link.is_rx_closed()
    }

    pub(crate) fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// Adds an item to what is pending: takes its budget permit (sending what is pending
    /// first if it has to wait for one), and moves its tracking to the next stage.
    /// `counted`: the item counts as passed on (not as failed).
    pub(crate) async fn push(
        &mut self,
        value: T,
        mut meta: MetaBox,
        counted: bool,
    ) -> Result<(), Closed> {
        if self.link.budget.get().is_some() {
            let link = Arc::clone(&self.link);
            if let Some(gate) = link.budget.get() {
                let weight = (gate.weigh)(&value);
                let permit = match gate.budget.try_acquire(weight) {
                    Some(permit) => permit,
                    None => {
                        self.send().await?;
                        self.ctx.counters.begin_wait(Wait::Output);
                        let permit = gate.budget.acquire(weight).await;
                        self.ctx.counters.end_wait(Wait::Output);
                        permit
                    }
                };
                meta.get_or_insert_with(Box::default).permits.push(permit);
            }
        }
        if self.push_now(value, meta, counted) {
            self.send().await?;
        }
        Ok(())
    }

    /// Whether items put here take a budget permit (then only `push` may add them).
    pub(crate) fn takes_budget(&self) -> bool {
        self.link.budget.get().is_some()
    }

    /// Adds an item that has what it needs (see `push`); true once a link's worth is pending.
    pub(crate) fn push_now(&mut self, value: T, meta: MetaBox, counted: bool) -> bool {
        if let Some(id) = track_id(&meta) {
            match self.link.consumer.get() {
                Some(next) => self.ctx.shared.set_item(id, next, ItemState::Waiting),
                None => self
                    .ctx
                    .shared
                    .set_item(id, self.ctx.name(), ItemState::Done),
            }
        }
        if self.pending.is_empty() {
            self.pending.reserve(self.last_chunk);
        }
        self.pending.push(value, meta);
        if counted {
            self.unsent_out += 1;
        }
        self.pending.len() >= self.chunk_size()
    }

    /// How much to gather before sending: half a link, so that a sender waiting for room
    /// (it waits for half the link, see `Link`) sends its whole chunk without splitting it.
    pub(crate) fn chunk_size(&self) -> usize {
        self.link.capacity().div_ceil(2)
    }

    /// Adds a whole batch of outputs to what is pending, without copying when it can.
    pub(crate) async fn push_chunk(
        &mut self,
        values: Vec<T>,
        metas: Vec<MetaBox>,
    ) -> Result<(), Closed> {
        let slow = self.link.budget.get().is_some() || metas.iter().any(|m| track_id(m).is_some());
        if slow {
            let mut metas = metas.into_iter();
            for value in values {
                self.push(value, metas.next().flatten(), true).await?;
            }
            return Ok(());
        }
        let chunk = Chunk::from_parts(values, metas);
        self.unsent_out += chunk.len() as u64;
        self.pending.append_all(chunk);
        Ok(())
    }

    /// Sends everything pending; waits for room as needed.
    pub(crate) async fn send(&mut self) -> Result<(), Closed> {
        let result = if self.pending.is_empty() {
            Ok(())
        } else {
            self.last_chunk = self.pending.len();
            poll_fn(|cx| {
                let poll = self.link.poll_send(cx, &mut self.pending);
                match (&poll, self.waiting) {
                    (Poll::Pending, false) => {
                        self.waiting = true;
                        self.ctx.counters.begin_wait(Wait::Output);
                    }
                    (Poll::Ready(_), true) => {
                        self.waiting = false;
                        self.ctx.counters.end_wait(Wait::Output);
                    }
                    _ => {}
                }
                poll
            })
            .await
        };
        if self.unsent_out > 0 {
            self.ctx.counters.add_out(mem::take(&mut self.unsent_out));
        }
        result
    }
}

pub(crate) fn urgent_meta() -> Meta {
    Meta {
        urgent: true,
        ..Meta::default()
    }
}
