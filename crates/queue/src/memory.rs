//! The in-memory backend: every topic lives in this process, nothing is persisted.
//!
//! [`MemoryQueue`] keeps the whole contract of the crate (see the crate docs) for consumers in
//! the same process: topics and groups are created on first use, every group sees every
//! message published after its creation, each message of a group goes to one member at a time,
//! a message leaves its group only when acked, and nacks, abandoned deliveries, dropped
//! consumers and passed ack deadlines redeliver it with `attempt + 1`.
//!
//! Order: within a group, messages are delivered in publish order; redeliveries that are due
//! (nacked, abandoned, expired, or whose nack delay has passed) go before messages that were
//! never delivered.
//!
//! Time is tokio time ([`tokio::time::Instant`]), so tests may pause and advance it. Ack deadlines
//! and nack delays are enforced by the members of the group while they wait in
//! [`Consumer::next`]; there is no background task, but `next` needs a tokio runtime with its
//! time driver enabled.
//!
//! A group lives as long as the queue, or until its topic is removed: messages published while
//! a group has no member are kept for it until a member acks them.
//!
//! [`MessageQueue::delete_topic`] drops the topic with its groups and every message they hold
//! (ready, delayed, delivered and not settled). The consumers of the removed topic end with
//! [`Error::Closed`], and settling what they hold changes nothing; the name is free for a new,
//! empty topic at once.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{self, AtomicBool};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Acker, Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

/// Stands in for "never" when a deadline or a delay does not fit in an [`Instant`]: 100 years.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// An in-process [`MessageQueue`].
///
/// Cloning is cheap and yields another handle to the same queue.
///
/// ```
/// use deployd_queue::memory::MemoryQueue;
/// use deployd_queue::{Message, MessageQueue, SubscribeOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), deployd_queue::Error> {
/// let queue = MemoryQueue::new();
/// let mut consumer = queue
///     .subscribe("deployd.app.echo", "workers", SubscribeOptions::default())
///     .await?;
/// queue.publish("deployd.app.echo", Message::new("hello")).await?;
/// let delivery = consumer.next().await?;
/// assert_eq!(delivery.message.payload, "hello");
/// delivery.ack().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl MemoryQueue {
    /// An empty, open queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes the queue: every consumer waiting in [`Consumer::next`] wakes up with
    /// [`Error::Closed`], and from now on `publish`, `subscribe` and `next` fail with it.
    /// Acks and nacks of deliveries already handed out still settle them. Closing twice is
    /// harmless.
    pub fn close(&self) {
        self.shared.closed.store(true, atomic::Ordering::SeqCst);
        let topics = self.shared.topics.read().unwrap_or_else(|e| e.into_inner());
        for topic in topics.values() {
            let mut state = topic.lock();
            state.closed = true;
            for group in &state.groups {
                group.notify.notify_waiters();
            }
        }
    }

    /// Whether [`MemoryQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(atomic::Ordering::SeqCst)
    }

    /// Runs `f` on topic `name`, creating the topic if needed.
    fn with_topic<R>(&self, name: &str, f: impl FnOnce(&Arc<Topic>) -> R) -> Result<R, Error> {
        {
            let topics = self.shared.topics.read().unwrap_or_else(|e| e.into_inner());
            if let Some(topic) = topics.get(name) {
                return Ok(f(topic));
            }
        }
        crate::validate_name("topic", name)?;
        let mut topics = self
            .shared
            .topics
            .write()
            .unwrap_or_else(|e| e.into_inner());
        // Read under the write lock: `close` sets the flag before it walks the topics, so a
        // topic created after that walk starts closed.
        let closed = self.is_closed();
        let topic = topics
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Topic::new(name, closed)));
        Ok(f(topic))
    }
}

#[async_trait]
impl MessageQueue for MemoryQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let mut message = Some(message);
        loop {
            let published = self.with_topic(topic, |topic| {
                let mut state = topic.lock();
                if state.closed {
                    return Err(Error::Closed);
                }
                if state.removed {
                    // Removed since it was looked up: publish to the topic that replaces it.
                    return Ok(false);
                }
                // A topic without groups drops the message: every group starts with the
                // messages published after its creation.
                if let Some((last, others)) = state.groups.split_last_mut()
                    && let Some(message) = message.take()
                {
                    for group in others {
                        group.push(message.clone());
                    }
                    last.push(message);
                }
                Ok(true)
            })??;
            if published {
                return Ok(());
            }
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Consumer>, Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        crate::validate_name("group", group)?;
        let (topic, index, notify, member, deadline_queue) = loop {
            let topic = self.with_topic(topic, Arc::clone)?;
            let mut state = topic.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            if state.removed {
                // Removed since it was looked up: join the topic that replaces it.
                continue;
            }
            let index = match state.groups.iter().position(|g| g.name == group) {
                Some(index) => index,
                None => {
                    state.groups.push(Group::new(group));
                    state.groups.len() - 1
                }
            };
            let group = &mut state.groups[index];
            let member = group.next_member;
            group.next_member += 1;
            let deadline_queue = group.deadline_queue(options.ack_deadline);
            let notify = Arc::clone(&group.notify);
            drop(state);
            break (topic, index, notify, member, deadline_queue);
        };
        Ok(Box::new(MemoryConsumer {
            topic,
            group: index,
            notify,
            member,
            deadline_queue,
        }))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        crate::validate_name("topic", topic)?;
        let removed = self
            .shared
            .topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        if let Some(removed) = removed {
            // Its consumers and ackers keep the `Arc`: closing it ends the consumers, and what
            // the ackers settle stays in a topic nobody reads.
            let mut state = removed.lock();
            state.removed = true;
            for group in &state.groups {
                group.notify.notify_waiters();
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Shared {
    closed: AtomicBool,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

/// One topic; a single mutex guards all its groups.
struct Topic {
    name: String,
    state: Mutex<TopicState>,
}

impl Topic {
    fn new(name: &str, closed: bool) -> Self {
        Self {
            name: name.to_owned(),
            state: Mutex::new(TopicState {
                closed,
                removed: false,
                groups: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        // Every critical section leaves the state consistent before anything that could
        // panic, so a poisoned lock still guards a usable state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct TopicState {
    closed: bool,
    /// Removed by `delete_topic`: no longer in the queue's map; its consumers end.
    removed: bool,
    /// Groups are never removed, so an index into this vector names a group for good.
    groups: Vec<Group>,
}

/// One consumer group of a topic.
struct Group {
    name: String,
    /// Wakes members waiting in `next`: `notify_one` for a message ready to take,
    /// `notify_waiters` when the earliest timer moved earlier or the queue closed.
    notify: Arc<Notify>,
    /// Messages never delivered, in publish order.
    ready: VecDeque<Message>,
    /// Redeliveries due now (attempt already incremented); they go before `ready`.
    retry: VecDeque<Message>,
    /// Nacked messages waiting for their delay (attempt already incremented).
    delayed: BinaryHeap<Delayed>,
    /// Delivered, not yet settled, by delivery tag.
    in_flight: HashMap<u64, InFlight, BuildHasherDefault<TagHasher>>,
    /// The ack deadlines of the deliveries, one queue per ack deadline duration of the members.
    deadlines: Vec<DeadlineQueue>,
    /// See [`Horizon`].
    horizon: Horizon,
    next_tag: u64,
    next_member: u64,
    next_delayed: u64,
}

struct InFlight {
    message: Message,
    member: u64,
}

/// The deadlines of the deliveries to the members with one ack deadline duration, in delivery
/// order, which is deadline order. Settled deliveries are removed lazily: from the front, or
/// all at once when they make up most of the queue.
struct DeadlineQueue {
    ack_deadline: Duration,
    entries: VecDeque<(Instant, u64)>,
}

/// Hashes delivery tags, which are sequential numbers: one multiplication (Fibonacci hashing)
/// spreads them, much faster than the default SipHash.
#[derive(Default)]
struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A bound on when the members waiting in `next` wake up by themselves: every waiting member
/// sleeps until this time at the latest. A new timer earlier than it wakes the waiting members
/// so that one of them sleeps until the new timer instead.
///
/// The variants are ordered: `Nobody < At(_) < Never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Horizon {
    /// No member started waiting since the waiting members were last woken.
    Nobody,
    /// Every waiting member wakes by then.
    At(Instant),
    /// Some member waits without a timer.
    Never,
}

/// A nacked message waiting for its delay; ordered so that the heap's top is the earliest due.
struct Delayed {
    due: Instant,
    seq: u64,
    message: Message,
}

impl Delayed {
    fn key(&self) -> (Instant, u64) {
        (self.due, self.seq)
    }
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: `BinaryHeap` is a max-heap.
        other.key().cmp(&self.key())
    }
}

/// `now + duration`, or a time too far away to matter when that does not fit.
fn after(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

impl Group {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            notify: Arc::new(Notify::new()),
            ready: VecDeque::new(),
            retry: VecDeque::new(),
            delayed: BinaryHeap::new(),
            in_flight: HashMap::default(),
            deadlines: Vec::new(),
            horizon: Horizon::Nobody,
            next_tag: 0,
            next_member: 0,
            next_delayed: 0,
        }
    }

    fn push(&mut self, message: Message) {
        self.ready.push_back(message);
        self.notify.notify_one();
    }

    fn has_ready(&self) -> bool {
        !(self.retry.is_empty() && self.ready.is_empty())
    }

    /// The index of the deadline queue for members with `ack_deadline`.
    fn deadline_queue(&mut self, ack_deadline: Duration) -> usize {
        match self
            .deadlines
            .iter()
            .position(|q| q.ack_deadline == ack_deadline)
        {
            Some(index) => index,
            None => {
                self.deadlines.push(DeadlineQueue {
                    ack_deadline,
                    entries: VecDeque::new(),
                });
                self.deadlines.len() - 1
            }
        }
    }

    /// Takes the next message for `member`, whose deadline queue is `queue`, and records it in
    /// flight.
    fn take(&mut self, member: u64, queue: usize, now: Instant) -> Option<(Message, u64)> {
        let message = self.retry.pop_front().or_else(|| self.ready.pop_front())?;
        let tag = self.next_tag;
        self.next_tag += 1;
        let delivered = message.clone();
        self.in_flight.insert(tag, InFlight { message, member });
        let queue = &mut self.deadlines[queue];
        let deadline = after(now, queue.ack_deadline);
        // `now` never goes back, so the queue stays in deadline order.
        queue.entries.push_back((deadline, tag));
        if queue.entries.len() > 2 * self.in_flight.len() + 64 {
            // Mostly settled deliveries: drop them all, for amortized constant time.
            let in_flight = &self.in_flight;
            queue.entries.retain(|(_, tag)| in_flight.contains_key(tag));
        }
        self.timer_added(deadline);
        Some((delivered, tag))
    }

    /// Removes delivery `tag` from flight; `None` when it was settled or redelivered already.
    fn settle(&mut self, tag: u64) -> Option<Message> {
        self.in_flight
            .remove(&tag)
            .map(|in_flight| in_flight.message)
    }

    /// Puts `message` back for redelivery with `attempt + 1`, at once or after `delay`.
    /// Does not wake anyone up for an immediate redelivery; the caller does.
    fn redeliver(&mut self, mut message: Message, delay: Option<Duration>, now: Instant) {
        message.attempt = message.attempt.saturating_add(1);
        match delay.filter(|delay| !delay.is_zero()) {
            None => self.retry.push_back(message),
            Some(delay) => {
                let due = after(now, delay);
                let seq = self.next_delayed;
                self.next_delayed += 1;
                self.delayed.push(Delayed { due, seq, message });
                self.timer_added(due);
            }
        }
    }

    /// Redelivers what passed its ack deadline and what finished its nack delay.
    /// Afterwards the front of every deadline queue is in flight.
    fn process_due(&mut self, topic: &str, now: Instant) {
        for queue in &mut self.deadlines {
            while let Some(&(deadline, tag)) = queue.entries.front() {
                if !self.in_flight.contains_key(&tag) {
                    queue.entries.pop_front();
                    continue;
                }
                if deadline > now {
                    break;
                }
                queue.entries.pop_front();
                if let Some(in_flight) = self.in_flight.remove(&tag) {
                    let mut message = in_flight.message;
                    message.attempt = message.attempt.saturating_add(1);
                    tracing::debug!(
                        topic,
                        group = %self.name,
                        id = %message.id,
                        attempt = message.attempt,
                        "ack deadline passed; redelivering"
                    );
                    self.retry.push_back(message);
                }
            }
        }
        while self.delayed.peek().is_some_and(|d| d.due <= now) {
            if let Some(delayed) = self.delayed.pop() {
                self.retry.push_back(delayed.message);
            }
        }
    }

    /// The earliest ack deadline or end of a nack delay; exact right after `process_due`, and
    /// never later than the truth.
    fn next_timer(&self) -> Option<Instant> {
        let deadlines = self.deadlines.iter().filter_map(|q| q.entries.front());
        let dues = self.delayed.peek().map(|d| d.due);
        deadlines.map(|&(deadline, _)| deadline).chain(dues).min()
    }

    /// A member is about to wait until `wake_at` (or a notification).
    fn arm(&mut self, wake_at: Option<Instant>) {
        let horizon = wake_at.map_or(Horizon::Never, Horizon::At);
        self.horizon = self.horizon.max(horizon);
    }

    /// A timer at `at` was added: wake the waiting members if none of them would be awake by
    /// then, so that they go back to sleep until the new earliest timer.
    fn timer_added(&mut self, at: Instant) {
        if Horizon::At(at) < self.horizon {
            self.horizon = Horizon::Nobody;
            self.notify.notify_waiters();
        }
    }
}

/// A member of a group of a [`MemoryQueue`].
struct MemoryConsumer {
    topic: Arc<Topic>,
    group: usize,
    notify: Arc<Notify>,
    member: u64,
    /// Index of this member's queue in `Group::deadlines`.
    deadline_queue: usize,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Result<Delivery, Error> {
        loop {
            // Registered under the lock (`enable`) so that no wake-up sent after the check
            // below is missed.
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            let wake_at = {
                let mut state = self.topic.lock();
                if state.closed || state.removed {
                    return Err(Error::Closed);
                }
                let now = Instant::now();
                let group = &mut state.groups[self.group];
                group.process_due(&self.topic.name, now);
                if let Some((message, tag)) = group.take(self.member, self.deadline_queue, now) {
                    if group.has_ready() {
                        // Pass the wake-up on: another waiting member may take the rest.
                        group.notify.notify_one();
                    }
                    drop(state);
                    let acker = MemoryAcker {
                        topic: Arc::clone(&self.topic),
                        group: self.group,
                        tag,
                    };
                    return Ok(Delivery::new(message, Box::new(acker)));
                }
                let wake_at = group.next_timer();
                group.arm(wake_at);
                notified.as_mut().enable();
                wake_at
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let mut state = self.topic.lock();
        let now = Instant::now();
        let group = &mut state.groups[self.group];
        let mut held: Vec<u64> = group
            .in_flight
            .iter()
            .filter(|(_, in_flight)| in_flight.member == self.member)
            .map(|(&tag, _)| tag)
            .collect();
        if held.is_empty() {
            return;
        }
        held.sort_unstable();
        tracing::debug!(
            topic = %self.topic.name,
            group = %group.name,
            count = held.len(),
            "consumer dropped; redelivering what it held"
        );
        for tag in held {
            if let Some(message) = group.settle(tag) {
                group.redeliver(message, None, now);
            }
        }
        group.notify.notify_one();
    }
}

/// Settles one delivery of a [`MemoryQueue`]. Settling a delivery that was redelivered in the
/// meantime (deadline passed, consumer dropped) does nothing.
struct MemoryAcker {
    topic: Arc<Topic>,
    group: usize,
    tag: u64,
}

/// How a delivery is settled.
enum Outcome {
    Ack,
    Redeliver { delay: Option<Duration> },
}

impl MemoryAcker {
    fn settle(&self, outcome: Outcome) {
        let mut state = self.topic.lock();
        let group = &mut state.groups[self.group];
        let Some(message) = group.settle(self.tag) else {
            return;
        };
        if let Outcome::Redeliver { delay } = outcome {
            group.redeliver(message, delay, Instant::now());
            if group.has_ready() {
                group.notify.notify_one();
            }
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        self.settle(Outcome::Ack);
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error> {
        self.settle(Outcome::Redeliver { delay });
        Ok(())
    }

    fn abandon(self: Box<Self>) {
        self.settle(Outcome::Redeliver { delay: None });
    }
}
