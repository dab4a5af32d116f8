//! The loops behind the closure stages and the input stream.
//!
//! They share one rule: what a stage has put stays in its `Output` (sent a chunk at a time)
//! until the stage would wait — for input, for a slow item, or for a batch — and is sent then.
//! Fast stages thus move whole chunks per lock, and a slow item never holds back finished ones.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::{Context, Poll};

use futures::future::Either;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{Stream, StreamExt};

use crate::error::{BoxError, Closed};
use crate::item::{MetaBox, track_id};
use crate::progress::ItemState;
use crate::stage::{BatchConfig, Concurrency, Input, Next, Order, Output};

/// What became of one item in a closure stage.
pub(crate) enum Step<U> {
    /// Passed on.
    Out(U),
    /// Failed, and passed on as a value (`try_stage`, `and_then`), with the error's text.
    Failed(U, String),
    /// Failed the pipeline.
    Fatal(BoxError),
}

/// Polls `fut` once; if it has to wait, sends what `output` holds first, then waits.
async fn or_send<F: Future, U: Send + 'static>(
    fut: F,
    output: &mut Output<U>,
) -> Result<F::Output, Closed> {
    let mut fut = pin!(fut);
    if let Poll::Ready(value) = futures::poll!(fut.as_mut()) {
        return Ok(value);
    }
    output.send().await?;
    Ok(fut.await)
}

/// Passes on the result of one item.
async fn deliver<U: Send + 'static>(
    output: &mut Output<U>,
    step: Step<U>,
    meta: MetaBox,
) -> Result<(), BoxError> {
    match step {
        Step::Out(value) => output.push(value, meta, true).await?,
        Step::Failed(value, error) => {
            output.ctx().counters.add_failed(1);
            output.ctx().mark(&meta, ItemState::Failed { error });
            output.push(value, meta, false).await?;
        }
        Step::Fatal(error) => {
            output.ctx().counters.add_failed(1);
            let text = error.to_string();
            output.ctx().mark(&meta, ItemState::Failed { error: text });
            return Err(error);
        }
    }
    Ok(())
}

/// A one-to-one closure stage. `call` starts the work on an item (`Left`) or passes it through
/// as it is (`Right`); `post` judges the work's result.
pub(crate) async fn run_items<T, U, Fut, C, P>(
    mut input: Input<T>,
    mut output: Output<U>,
    concurrency: Concurrency,
    mut call: C,
    mut post: P,
) -> Result<(), BoxError>
where
    T: Send + 'static,
    U: Send + 'static,
    Fut: Future + Send,
    Fut::Output: Send,
    C: FnMut(T) -> Either<Fut, U> + Send,
    P: FnMut(Fut::Output) -> Step<U> + Send,
{
    if concurrency.limit() > 1 {
        return run_items_concurrently(input, output, concurrency, call, post).await;
    }
    loop {
        let next = match input.pop_local() {
            Some((value, meta)) => Next::Item(value, meta),
            None => {
                // Send before taking more: the link's credit then covers what is pending.
                output.send().await?;
                poll_fn(|cx| input.poll_next(cx)).await
            }
        };
        match next {
            Next::Item(value, meta) => match call(value) {
                Either::Left(work) => {
                    let result = or_send(work, &mut output).await?;
                    deliver(&mut output, post(result), meta).await?;
                }
                Either::Right(value) => output.push(value, meta, true).await?,
            },
            Next::Flush => output.flush().await?,
            Next::End => break,
        }
    }
    output.send().await?;
    Ok(())
}

enum Outcome<O, U> {
    Ran(O),
    Passed(U),
}

async fn start<Fut: Future, U>(
    meta: MetaBox,
    call: Either<Fut, U>,
) -> (MetaBox, Outcome<Fut::Output, U>) {
    match call {
        Either::Left(work) => (meta, Outcome::Ran(work.await)),
        Either::Right(value) => (meta, Outcome::Passed(value)),
    }
}

enum InFlight<F: Future> {
    Ordered(FuturesOrdered<F>),
    Unordered(FuturesUnordered<F>),
}

impl<F: Future> InFlight<F> {
    fn push(&mut self, fut: F) {
        match self {
            InFlight::Ordered(set) => set.push_back(fut),
            InFlight::Unordered(set) => set.push(fut),
        }
    }

    fn len(&self) -> usize {
        match self {
            InFlight::Ordered(set) => set.len(),
            InFlight::Unordered(set) => set.len(),
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        match self {
            InFlight::Ordered(set) => set.poll_next_unpin(cx),
            InFlight::Unordered(set) => set.poll_next_unpin(cx),
        }
    }
}

enum Event<D, T> {
    Done(D),
    Input(Next<T>),
}

async fn run_items_concurrently<T, U, Fut, C, P>(
    mut input: Input<T>,
    mut output: Output<U>,
    concurrency: Concurrency,
    mut call: C,
    mut post: P,
) -> Result<(), BoxError>
where
    T: Send + 'static,
    U: Send + 'static,
    Fut: Future + Send,
    Fut::Output: Send,
    C: FnMut(T) -> Either<Fut, U> + Send,
    P: FnMut(Fut::Output) -> Step<U> + Send,
{
    let limit = concurrency.limit();
    let mut in_flight = match concurrency.order() {
        Order::Input => InFlight::Ordered(FuturesOrdered::new()),
        Order::Completion => InFlight::Unordered(FuturesUnordered::new()),
    };
    let mut ended = false;
    // A flush passes on once the items before it have: no new items start meanwhile.
    let mut flushing = false;
    loop {
        if flushing && in_flight.len() == 0 {
            output.flush().await?;
            flushing = false;
        }
        while !flushing && in_flight.len() < limit {
            let Some((value, meta)) = input.pop_local() else {
                break;
            };
            in_flight.push(start(meta, call(value)));
        }
        if ended && in_flight.len() == 0 {
            break;
        }
        let want_input = !ended && !flushing && in_flight.len() < limit;
        let event = poll_fn(|cx| {
            if in_flight.len() > 0
                && let Poll::Ready(Some(done)) = in_flight.poll_next(cx)
            {
                return Poll::Ready(Event::Done(done));
            }
            if want_input && let Poll::Ready(next) = input.poll_next(cx) {
                return Poll::Ready(Event::Input(next));
            }
            Poll::Pending
        });
        match or_send(event, &mut output).await? {
            Event::Done((meta, Outcome::Ran(result))) => {
                deliver(&mut output, post(result), meta).await?;
            }
            Event::Done((meta, Outcome::Passed(value))) => output.push(value, meta, true).await?,
            Event::Input(Next::Item(value, meta)) => in_flight.push(start(meta, call(value))),
            Event::Input(Next::Flush) => flushing = true,
            Event::Input(Next::End) => ended = true,
        }
    }
    output.send().await?;
    Ok(())
}

/// A batched closure stage: `f` gets each batch's values and returns the outputs. When it
/// returns as many outputs as it got inputs, output `i` carries what travelled with input `i`
/// (budget permit, tracking, urgency); otherwise that is released with the batch.
pub(crate) async fn run_batches<T, U, F, Fut, E>(
    mut input: Input<T>,
    mut output: Output<U>,
    config: BatchConfig,
    mut f: F,
) -> Result<(), BoxError>
where
    T: Send + 'static,
    U: Send + 'static,
    F: FnMut(Vec<T>) -> Fut + Send,
    Fut: Future<Output = Result<Vec<U>, E>> + Send,
    E: Into<BoxError>,
{
    loop {
        let next = or_send(
            poll_fn(|cx| input.poll_next_batch(cx, &config)),
            &mut output,
        )
        .await?;
        let Some(batch) = next else {
            break;
        };
        let (values, metas) = batch.into_parts();
        let n = values.len();
        match f(values).await {
            Ok(outputs) if outputs.len() == n => output.push_chunk(outputs, metas).await?,
            Ok(outputs) => {
                for meta in &metas {
                    output.ctx().mark(meta, ItemState::Done);
                }
                drop(metas);
                output.push_chunk(outputs, Vec::new()).await?;
            }
            Err(error) => {
                let error: BoxError = error.into();
                output.ctx().counters.add_failed(n as u64);
                let text = error.to_string();
                for meta in metas.iter().filter(|m| track_id(m).is_some()) {
                    output.ctx().mark(
                        meta,
                        ItemState::Failed {
                            error: text.clone(),
                        },
                    );
                }
                return Err(error);
            }
        }
        // A batch's outputs go on at once: batches are the unit of work and of latency.
        output.send().await?;
    }
    output.send().await?;
    Ok(())
}

/// The input stream of a pipeline, as its first stage.
pub(crate) async fn run_source<T, S>(stream: S, mut output: Output<T>) -> Result<(), BoxError>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send,
{
    let mut stream = pin!(stream);
    if output.takes_budget() {
        while let Some(value) = or_send(stream.next(), &mut output).await? {
            output.push(value, None, true).await?;
        }
    } else {
        loop {
            // Gather what the stream has ready, up to a chunk, in a plain `Vec` (the tightest
            // loop there is), then hand it over whole.
            let chunk_size = output.chunk_size();
            let mut chunk = Vec::with_capacity(chunk_size.min(1024));
            let ended = poll_fn(|cx| {
                loop {
                    match stream.as_mut().poll_next(cx) {
                        Poll::Ready(Some(value)) => {
                            chunk.push(value);
                            if chunk.len() >= chunk_size {
                                return Poll::Ready(false);
                            }
                        }
                        Poll::Ready(None) => return Poll::Ready(true),
                        Poll::Pending if !chunk.is_empty() => return Poll::Ready(false),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await;
            output.push_chunk(chunk, Vec::new()).await?;
            output.send().await?;
            if ended {
                break;
            }
        }
    }
    output.send().await?;
    Ok(())
}

/// An iterator as the input of a pipeline: taken a chunk at a time with `extend`.
pub(crate) async fn run_iter_source<T, I>(
    mut items: I,
    mut output: Output<T>,
) -> Result<(), BoxError>
where
    T: Send + 'static,
    I: Iterator<Item = T> + Send,
{
    if output.takes_budget() {
        for value in items {
            output.push(value, None, true).await?;
        }
    } else {
        loop {
            let chunk_size = output.chunk_size();
            let mut chunk = Vec::with_capacity(chunk_size.min(1024));
            chunk.extend(items.by_ref().take(chunk_size));
            if chunk.is_empty() {
                break;
            }
            // `send` waits once the link is full: backpressure is where the source yields.
            output.push_chunk(chunk, Vec::new()).await?;
            output.send().await?;
        }
    }
    output.send().await?;
    Ok(())
}
