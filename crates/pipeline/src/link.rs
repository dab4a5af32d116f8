//! The bounded channel between two stages.
//!
//! A link holds at most `capacity` items, counting both what is queued and what the receiving
//! stage has taken and not yet passed on: the receiver gives that room back when it comes for
//! more (a stage reading batches: when it comes for its next batch, in steps of a quarter
//! link). A sender that finds the link full waits until half of it is free, so a fast
//! producer and a fast consumer trade big chunks instead of waking each other for every one.
//!
//! The receiver takes everything queued at once, by swapping buffers, and a sender moves a
//! whole chunk of items per lock. Chunks travel whole from stage to stage, so a batch of 100
//! crosses a link without being copied, and the cost per item is a push and a pop, not a lock
//! and a wakeup.
//!
//! End of stream is the last sender finishing; a sender dropped without finishing (its stage
//! failed, panicked or was cancelled) *aborts* the link instead, and the receiver then waits
//! forever: the pipeline reports the error and cancels it, so downstream stages never mistake a
//! failure upstream for a clean end of their input.

use std::mem;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::budget::BudgetGate;
use crate::error::Closed;
use crate::item::{Chunk, MetaBox, Queue};
use crate::progress::TrackGate;

pub(crate) struct Link<T> {
    state: Mutex<State<T>>,
    capacity: AtomicUsize,
    /// The budget items take before entering this link.
    pub(crate) budget: OnceLock<BudgetGate<T>>,
    /// Items read from this link get an entry in the per-item progress.
    pub(crate) track: OnceLock<TrackGate<T>>,
    /// The name of the stage reading this link; none for the output of the pipeline.
    pub(crate) consumer: OnceLock<Arc<str>>,
}

struct State<T> {
    queue: Queue<T>,
    /// Items the receiver took and has not come back for more since.
    held: usize,
    flush: bool,
    senders: usize,
    aborted: bool,
    rx_closed: bool,
    /// Nobody wants the items: senders drop them (the output of a pipeline that is drained).
    discard: bool,
    rx_waker: Option<Waker>,
    tx_wakers: Vec<Waker>,
    /// The least room a waiting sender wants before it is worth waking (`usize::MAX`: none
    /// waits). Senders wait for a good share of the link rather than for every free slot, so
    /// a fast producer and a fast consumer do not wake each other for every chunk.
    tx_want: usize,
}

impl<T> State<T> {
    /// The waiting senders, if the room they want is free.
    fn senders_to_wake(&mut self, capacity: usize) -> Vec<Waker> {
        let room = capacity.saturating_sub(self.queue.len() + self.held);
        if self.tx_wakers.is_empty() || room < self.tx_want {
            return Vec::new();
        }
        self.tx_want = usize::MAX;
        mem::take(&mut self.tx_wakers)
    }

    fn wait_for_room(&mut self, cx: &Context<'_>, want: usize) {
        add_waker(&mut self.tx_wakers, cx);
        self.tx_want = self.tx_want.min(want.max(1));
    }
}

/// What the receiver got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Items; `flush` when a sender asked for a flush after sending the last of them.
    Items { flush: bool },
    /// A flush and no items.
    Flush,
    /// End of stream.
    Closed,
}

impl<T> Link<T> {
    pub(crate) fn new(capacity: usize, senders: usize) -> Arc<Self> {
        Arc::new(Link {
            state: Mutex::new(State {
                queue: Queue::default(),
                held: 0,
                flush: false,
                senders,
                aborted: false,
                rx_closed: false,
                discard: false,
                rx_waker: None,
                tx_wakers: Vec::new(),
                tx_want: usize::MAX,
            }),
            capacity: AtomicUsize::new(capacity.max(1)),
            budget: OnceLock::new(),
            track: OnceLock::new(),
            consumer: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing runs user code under this lock, so a poisoned lock still holds sound state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    pub(crate) fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
        let mut s = self.lock();
        s.tx_want = usize::MAX;
        let wakers = mem::take(&mut s.tx_wakers);
        drop(s);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Receives everything queued into `local`, which must be empty; gives back the credit of
    /// what was taken last time.
    pub(crate) fn poll_fill(&self, cx: &mut Context<'_>, local: &mut Queue<T>) -> Poll<Fill> {
        debug_assert!(local.is_empty());
        let capacity = self.capacity();
        let mut s = self.lock();
        s.held = 0;
        let result = if s.aborted {
            // The pipeline is failing and cancels this stage; never report an end of stream.
            Poll::Pending
        } else if !s.queue.is_empty() {
            mem::swap(&mut s.queue, local);
            s.held = local.len();
            Poll::Ready(Fill::Items {
                flush: mem::take(&mut s.flush),
            })
        } else if mem::take(&mut s.flush) {
            Poll::Ready(Fill::Flush)
        } else if s.senders == 0 {
            Poll::Ready(Fill::Closed)
        } else {
            set_waker(&mut s.rx_waker, cx);
            Poll::Pending
        };
        let wakers = s.senders_to_wake(capacity);
        drop(s);
        wakers.into_iter().for_each(Waker::wake);
        result
    }

    /// Gives back the credit of `n` items the receiver took and has since handed out.
    pub(crate) fn credit(&self, n: usize) {
        let capacity = self.capacity();
        let mut s = self.lock();
        s.held = s.held.saturating_sub(n);
        let wakers = s.senders_to_wake(capacity);
        drop(s);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Sends as much of `pending` as there is room for; ready once all of it is sent.
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        pending: &mut Chunk<T>,
    ) -> Poll<Result<(), Closed>> {
        if pending.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let capacity = self.capacity();
        let mut s = self.lock();
        if s.rx_closed {
            return Poll::Ready(Err(Closed));
        }
        if s.discard {
            drop(s);
            // Dropped here, outside the lock, with their budget permits.
            *pending = Chunk::default();
            return Poll::Ready(Ok(()));
        }
        let room = capacity.saturating_sub(s.queue.len() + s.held);
        let n = room.min(pending.len());
        let waker = if n > 0 {
            let chunk = if n == pending.len() {
                mem::take(pending)
            } else {
                pending.split_front(n)
            };
            s.queue.push_chunk(chunk);
            s.rx_waker.take()
        } else {
            None
        };
        let result = if pending.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            s.wait_for_room(cx, capacity.div_ceil(2));
            Poll::Pending
        };
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
        result
    }

    /// Sends one item when there is room (the multi-producer path of a `Feeder`).
    pub(crate) fn poll_send_one(
        &self,
        cx: &mut Context<'_>,
        slot: &mut Option<(T, MetaBox)>,
    ) -> Poll<Result<(), Closed>> {
        if slot.is_none() {
            return Poll::Ready(Ok(()));
        }
        let capacity = self.capacity();
        let mut s = self.lock();
        if s.rx_closed {
            return Poll::Ready(Err(Closed));
        }
        if s.discard {
            drop(s);
            drop(slot.take());
            return Poll::Ready(Ok(()));
        }
        if s.queue.len() + s.held >= capacity {
            s.wait_for_room(cx, 1);
            return Poll::Pending;
        }
        let Some((value, meta)) = slot.take() else {
            return Poll::Ready(Ok(()));
        };
        s.queue.push(value, meta);
        let waker = s.rx_waker.take();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }

    /// From now on, senders drop what they send (nothing is queued any more).
    pub(crate) fn discard(&self) {
        let mut s = self.lock();
        s.discard = true;
        let queued = mem::take(&mut s.queue);
        s.tx_want = usize::MAX;
        let wakers = mem::take(&mut s.tx_wakers);
        drop(s);
        drop(queued);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Asks the receiver to release the batch it is building once it has read what was sent.
    pub(crate) fn signal_flush(&self) {
        let mut s = self.lock();
        s.flush = true;
        let waker = s.rx_waker.take();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub(crate) fn is_rx_closed(&self) -> bool {
        self.lock().rx_closed
    }

    pub(crate) fn add_sender(&self) {
        self.lock().senders += 1;
    }

    /// One sender is done: cleanly (end of stream once all are) or not (the link aborts).
    pub(crate) fn close_sender(&self, clean: bool) {
        let mut s = self.lock();
        s.senders = s.senders.saturating_sub(1);
        if !clean {
            s.aborted = true;
        }
        let waker = s.rx_waker.take();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close_receiver(&self) {
        let mut s = self.lock();
        s.rx_closed = true;
        let queued = mem::take(&mut s.queue);
        s.tx_want = usize::MAX;
        let wakers = mem::take(&mut s.tx_wakers);
        drop(s);
        // Items (and their budget permits) are dropped outside the lock.
        drop(queued);
        wakers.into_iter().for_each(Waker::wake);
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn add_waker(wakers: &mut Vec<Waker>, cx: &Context<'_>) {
    if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
        wakers.push(cx.waker().clone());
    }
}

/// The receiving end; dropping it makes every `put` into the link fail with [`Closed`].
pub(crate) struct Receiver<T> {
    pub(crate) link: Arc<Link<T>>,
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.link.close_receiver();
    }
}

/// The sender count a stage task holds on its output link: finished when the stage returns
/// normally, otherwise dropped, which aborts the link.
pub(crate) struct CloseGuard<T> {
    link: Option<Arc<Link<T>>>,
}

impl<T> CloseGuard<T> {
    pub(crate) fn new(link: Arc<Link<T>>) -> Self {
        CloseGuard { link: Some(link) }
    }

    pub(crate) fn finish(mut self) {
        if let Some(link) = self.link.take() {
            link.close_sender(true);
        }
    }
}

impl<T> Drop for CloseGuard<T> {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            link.close_sender(false);
        }
    }
}
