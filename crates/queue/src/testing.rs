//! The conformance suite every [`MessageQueue`] backend runs.
//!
//! Each case is a `pub async fn(&dyn MessageQueue, prefix: &str)` that panics with a message
//! saying which part of the contract was broken. The prefix makes the case's topic names
//! unique, so the cases can run at the same time against one broker, and again on the next run
//! against a broker that kept the old topics; [`unique_prefix`] builds one.
//!
//! A backend's test file instantiates every case as its own test with [`conformance_tests!`]:
//!
//! ```
//! use deployd_queue::memory::MemoryQueue;
//!
//! deployd_queue::conformance_tests!(#[tokio::test(start_paused = true)] queue = MemoryQueue::new());
//! ```
//!
//! The `queue` expression is evaluated inside each async test, so it may `.await` (to connect
//! to a broker). Backends whose clients do real IO must not use paused time: tokio advances a
//! paused clock whenever the runtime is idle, which fires the suite's timeouts while a broker
//! answers. [`run_all`] runs every case in turn, for a single test or a smoke check.
//!
//! What the suite assumes of a backend beyond the crate's contract:
//! - [`Consumer::next`] is cancel safe: the suite bounds every wait with
//!   [`tokio::time::timeout`], and a `next` dropped before it returned must not lose or hold a
//!   message.
//! - Redelivery of a nacked or abandoned message, or of the messages of a dropped consumer,
//!   arrives within [`RECEIVE_TIMEOUT`] (well below the default ack deadline).
//! - A nack delay and an ack deadline of a fraction of a second are honoured (not early; late
//!   by less than [`RECEIVE_TIMEOUT`]).
//!
//! Waits are short and bounded, so a broken backend fails instead of hanging: an expected
//! message must arrive within [`RECEIVE_TIMEOUT`]; "nothing else arrives" is watched for
//! [`QUIET_PERIOD`].
//!
//! Two more cases need a broker that the test can stop and start, through a [`BrokerControl`]:
//! [`publish_while_down_fails_within_bound`] and [`reconnects_after_restart`]. A backend test
//! runs them with a broker of its own: a server process the test starts and kills
//! ([`BrokerProcess`]), or, for a broker the test cannot restart, a [`TcpProxy`] in front of
//! it whose stop cuts every connection and refuses new ones. The in-memory backend has no
//! connection to lose and is exempt from both.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, timeout};

use crate::{Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

mod broker;

pub use broker::{BrokerControl, BrokerProcess, START_TIMEOUT, TcpProxy, free_port, wait_for_port};

/// How long the suite waits for a message that must arrive (or for any other queue call).
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the suite watches for a message that must not arrive.
pub const QUIET_PERIOD: Duration = Duration::from_millis(250);

/// The short ack deadline of the deadline cases.
pub const SHORT_ACK_DEADLINE: Duration = Duration::from_millis(200);

/// The delay of the delayed-nack case.
pub const NACK_DELAY: Duration = Duration::from_millis(500);

/// The delay of the message nacked before its topic is removed in
/// [`delete_topic_removes_its_messages`]: whole seconds, as SQS counts them.
pub const REMOVED_NACK_DELAY: Duration = Duration::from_secs(1);

/// How long [`delete_topic_removes_its_messages`] watches a new group for old messages: past
/// the end of [`REMOVED_NACK_DELAY`] by as much again.
pub const REMOVED_WATCH: Duration = Duration::from_secs(2);

/// The number of messages of [`many_messages_through_four_consumers`].
pub const MANY_MESSAGES: usize = 100_000;

/// A topic prefix unique to this run: `conformance.{case}.{random}`.
pub fn unique_prefix(case: &str) -> String {
    format!("conformance.{case}.{}", uuid::Uuid::new_v4().simple())
}

/// Instantiates every conformance case as its own test.
///
/// The attributes (at least the test attribute, such as `#[tokio::test]`) go on every
/// generated `async fn`; `queue` is an expression evaluated at the start of each test whose
/// value implements [`MessageQueue`] (it may `.await`). An optional `many_messages = N`
/// replaces [`MANY_MESSAGES`] in [`many_messages_through_four_consumers`], for a test broker
/// too slow for it (say which and why where you use it). See the
/// [module docs](crate::testing).
#[macro_export]
macro_rules! conformance_tests {
    ($(#[$attr:meta])+ queue = $queue:expr $(,)?) => {
        $crate::conformance_tests!(
            $(#[$attr])+ queue = $queue, many_messages = $crate::testing::MANY_MESSAGES
        );
    };
    ($(#[$attr:meta])+ queue = $queue:expr, many_messages = $many:expr $(,)?) => {
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] round_trip);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] competing_consumers_split_the_work);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] every_group_sees_every_message);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] group_starts_at_its_creation);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] nack_redelivers);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] abandoned_delivery_redelivers);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] nack_delay_is_honoured);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] dropped_consumer_redelivers);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] ack_deadline_redelivers);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] late_ack_keeps_the_redelivery);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] late_nack_adds_no_copy);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] large_payloads);
        $(#[$attr])+
        async fn many_messages_through_four_consumers() {
            let queue = $queue;
            let prefix = $crate::testing::unique_prefix("many_messages_through_four_consumers");
            $crate::testing::many_messages_through_four_consumers_n(&queue, &prefix, $many).await;
        }
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] fifo_for_one_consumer);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] invalid_names_rejected);
        $crate::conformance_tests!(@case [$(#[$attr])+] [$queue] delete_topic_removes_its_messages);
    };
    (@case [$(#[$attr:meta])+] [$queue:expr] $case:ident) => {
        $(#[$attr])+
        async fn $case() {
            let queue = $queue;
            let prefix = $crate::testing::unique_prefix(stringify!($case));
            $crate::testing::$case(&queue, &prefix).await;
        }
    };
}

/// Runs every case in turn, each under `{prefix}.{case}`.
pub async fn run_all(queue: &dyn MessageQueue, prefix: &str) {
    round_trip(queue, &format!("{prefix}.round_trip")).await;
    competing_consumers_split_the_work(queue, &format!("{prefix}.competing")).await;
    every_group_sees_every_message(queue, &format!("{prefix}.fan_out")).await;
    group_starts_at_its_creation(queue, &format!("{prefix}.group_start")).await;
    nack_redelivers(queue, &format!("{prefix}.nack")).await;
    abandoned_delivery_redelivers(queue, &format!("{prefix}.abandon")).await;
    nack_delay_is_honoured(queue, &format!("{prefix}.nack_delay")).await;
    dropped_consumer_redelivers(queue, &format!("{prefix}.dropped")).await;
    ack_deadline_redelivers(queue, &format!("{prefix}.deadline")).await;
    late_ack_keeps_the_redelivery(queue, &format!("{prefix}.late_ack")).await;
    late_nack_adds_no_copy(queue, &format!("{prefix}.late_nack")).await;
    large_payloads(queue, &format!("{prefix}.large")).await;
    many_messages_through_four_consumers(queue, &format!("{prefix}.many")).await;
    fifo_for_one_consumer(queue, &format!("{prefix}.fifo")).await;
    invalid_names_rejected(queue, &format!("{prefix}.names")).await;
    delete_topic_removes_its_messages(queue, &format!("{prefix}.delete")).await;
}

/// A message published on a topic arrives unchanged: id, headers and payload, with attempt 1;
/// once acked it does not come back.
pub async fn round_trip(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let sent = [
        Message::new(Bytes::from_static(b"{\"input\": \"hello\"}"))
            .with_header("task-id", "42")
            .with_header("content-type", "application/json"),
        Message::new(Bytes::new()),
        Message::new((0..=255u8).collect::<Vec<u8>>()).with_header("empty", ""),
    ];
    for message in &sent {
        publish(queue, &topic, message.clone()).await;
    }
    for message in &sent {
        let delivery = receive(&mut *consumer, "a published message").await;
        assert_eq!(
            delivery.message, *message,
            "the message must arrive unchanged (id, headers, payload) with attempt 1"
        );
        ack(delivery).await;
    }
    expect_nothing(&mut consumer, "after every message was acked").await;
}

/// Members of one group take turns: while one member holds a message, the others get other
/// messages; every message is delivered once.
pub async fn competing_consumers_split_the_work(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(subscribe(queue, &topic, "workers", SubscribeOptions::default()).await);
    }
    let sent = publish_numbered(queue, &topic, 12).await;
    let mut seen = HashSet::new();
    for round in 0..4 {
        // Each member holds one message at a time; they must all be different.
        let mut held = Vec::new();
        for (member, consumer) in members.iter_mut().enumerate() {
            let delivery = receive(&mut **consumer, "a message for an idle member").await;
            assert!(
                seen.insert(delivery.message.id.clone()),
                "round {round}: member {member} got message {} (attempt {}) that another \
                 member had already received",
                delivery.message.id,
                delivery.message.attempt
            );
            assert_eq!(delivery.message.attempt, 1, "no message was redelivered");
            held.push(delivery);
        }
        for delivery in held {
            ack(delivery).await;
        }
    }
    assert_same_ids(&sent, &seen, "the group received");
    expect_nothing_on_any(&mut members, "after every message was acked").await;
}

/// Two groups on one topic each receive every message; two members of one group share them.
pub async fn every_group_sees_every_message(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.events");
    let mut audit = subscribe(queue, &topic, "audit", SubscribeOptions::default()).await;
    let mut workers = vec![
        subscribe(queue, &topic, "workers", SubscribeOptions::default()).await,
        subscribe(queue, &topic, "workers", SubscribeOptions::default()).await,
    ];
    let sent = publish_numbered(queue, &topic, 10).await;

    let mut audited = HashSet::new();
    for _ in 0..sent.len() {
        let delivery = receive(&mut *audit, "every message in group `audit`").await;
        assert!(
            audited.insert(delivery.message.id.clone()),
            "group `audit` got message {} twice",
            delivery.message.id
        );
        ack(delivery).await;
    }
    assert_same_ids(&sent, &audited, "group `audit` received");

    let mut worked = HashSet::new();
    for _ in 0..sent.len() {
        let (_, delivery) =
            receive_from_any(&mut workers, "every message in group `workers`").await;
        assert!(
            worked.insert(delivery.message.id.clone()),
            "group `workers` got message {} twice",
            delivery.message.id
        );
        ack(delivery).await;
    }
    assert_same_ids(&sent, &worked, "group `workers` received");

    expect_nothing(&mut audit, "in group `audit` after all was acked").await;
    expect_nothing_on_any(&mut workers, "in group `workers` after all was acked").await;
}

/// A group created after a message was published does not receive that message.
pub async fn group_starts_at_its_creation(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.events");
    let mut early = subscribe(queue, &topic, "early", SubscribeOptions::default()).await;
    let before = Message::new("before").with_header("sent", "before the late group");
    publish(queue, &topic, before.clone()).await;
    let mut late = subscribe(queue, &topic, "late", SubscribeOptions::default()).await;
    let after = Message::new("after").with_header("sent", "after the late group");
    publish(queue, &topic, after.clone()).await;

    for expected in [&before, &after] {
        let delivery = receive(&mut *early, "the messages of the early group").await;
        assert_eq!(
            delivery.message.id, expected.id,
            "the early group sees both"
        );
        ack(delivery).await;
    }
    let delivery = receive(&mut *late, "the message published after the late group").await;
    assert_eq!(
        delivery.message.id, after.id,
        "the late group must start with the first message published after its creation"
    );
    ack(delivery).await;
    expect_nothing(&mut late, "in the late group").await;
}

/// A nack redelivers the message at once, unchanged but for `attempt + 1`; so does a nack with
/// a zero delay.
pub async fn nack_redelivers(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let sent = Message::new("retry me").with_header("task-id", "7");
    publish(queue, &topic, sent.clone()).await;

    let first = receive(&mut *consumer, "the published message").await;
    assert_eq!(first.message, sent);
    nack(first, None).await;
    let second = receive(&mut *consumer, "the message after a nack").await;
    let expected = Message {
        attempt: 2,
        ..sent.clone()
    };
    assert_eq!(second.message, expected, "a nack redelivers with attempt 2");
    nack(second, Some(Duration::ZERO)).await;
    let third = receive(&mut *consumer, "the message after a nack with a zero delay").await;
    let expected = Message {
        attempt: 3,
        ..sent.clone()
    };
    assert_eq!(third.message, expected, "a nack redelivers with attempt 3");
    ack(third).await;
    expect_nothing(&mut consumer, "after the redelivery was acked").await;
}

/// A delivery dropped without ack or nack is redelivered at once with `attempt + 1`.
pub async fn abandoned_delivery_redelivers(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let sent = Message::new("drop me");
    publish(queue, &topic, sent.clone()).await;

    let first = receive(&mut *consumer, "the published message").await;
    drop(first);
    let second = receive(
        &mut *consumer,
        "the message after its delivery was dropped unsettled",
    )
    .await;
    assert_eq!(second.message.id, sent.id);
    assert_eq!(
        second.message.attempt, 2,
        "an abandoned delivery counts as a nack"
    );
    ack(second).await;
    expect_nothing(&mut consumer, "after the redelivery was acked").await;
}

/// A message nacked with a delay comes back after the delay, not before, and does not hold up
/// the messages behind it.
pub async fn nack_delay_is_honoured(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let delayed = Message::new("later");
    publish(queue, &topic, delayed.clone()).await;
    let first = receive(&mut *consumer, "the message to delay").await;
    assert_eq!(first.message.id, delayed.id);
    let nacked_at = Instant::now();
    nack(first, Some(NACK_DELAY)).await;

    let other = Message::new("now");
    publish(queue, &topic, other.clone()).await;
    let delivery = receive(&mut *consumer, "a message published after the delayed one").await;
    assert_eq!(
        delivery.message.id, other.id,
        "a message nacked with a delay of {NACK_DELAY:?} must not block or precede the next one"
    );
    ack(delivery).await;

    let again = receive(&mut *consumer, "the delayed message").await;
    let waited = nacked_at.elapsed();
    assert_eq!(again.message.id, delayed.id);
    assert_eq!(again.message.attempt, 2);
    assert!(
        waited >= NACK_DELAY,
        "redelivered {waited:?} after a nack with a delay of {NACK_DELAY:?}"
    );
    ack(again).await;
    expect_nothing(&mut consumer, "after the delayed message was acked").await;
}

/// The messages a consumer holds unsettled when it is dropped go to another member, with
/// `attempt + 1`. The deliveries are leaked, not dropped, as when a worker crashes.
pub async fn dropped_consumer_redelivers(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut doomed = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let sent = publish_numbered(queue, &topic, 2).await;
    let mut held = Vec::new();
    for _ in 0..sent.len() {
        held.push(receive(&mut *doomed, "a message for the member about to go").await);
    }
    let mut survivor = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    for delivery in held {
        std::mem::forget(delivery);
    }
    drop(doomed);

    let mut redelivered = HashSet::new();
    for _ in 0..sent.len() {
        let delivery = receive(
            &mut *survivor,
            "the messages held by the dropped consumer, on the remaining member",
        )
        .await;
        assert_eq!(
            delivery.message.attempt, 2,
            "a message held by a dropped consumer is redelivered with attempt 2"
        );
        redelivered.insert(delivery.message.id.clone());
        ack(delivery).await;
    }
    assert_same_ids(&sent, &redelivered, "the remaining member received");
    expect_nothing(&mut survivor, "after the redeliveries were acked").await;
}

/// A delivery not settled within the ack deadline is redelivered with `attempt + 1`, not
/// before the deadline; dropping the expired delivery afterwards changes nothing.
pub async fn ack_deadline_redelivers(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let short = SubscribeOptions::default().ack_deadline(SHORT_ACK_DEADLINE);
    let mut slow = subscribe(queue, &topic, "workers", short).await;
    let sent = Message::new("too slow");
    publish(queue, &topic, sent.clone()).await;
    let received_at = Instant::now();
    let expired = receive(&mut *slow, "the published message").await;
    assert_eq!(expired.message.id, sent.id);

    let mut members = vec![
        slow,
        subscribe(queue, &topic, "workers", SubscribeOptions::default()).await,
    ];
    let (_, again) = receive_from_any(&mut members, "the message after its ack deadline").await;
    let waited = received_at.elapsed();
    assert_eq!(again.message.id, sent.id);
    assert_eq!(
        again.message.attempt, 2,
        "an expired delivery counts as a nack"
    );
    assert!(
        waited >= SHORT_ACK_DEADLINE,
        "redelivered {waited:?} after delivery with an ack deadline of {SHORT_ACK_DEADLINE:?}"
    );
    ack(again).await;
    drop(expired);
    expect_nothing_on_any(
        &mut members,
        "after the redelivery was acked and the expired delivery dropped",
    )
    .await;
}

/// An ack that comes after the ack deadline, when the message was redelivered already, does
/// not remove the redelivered copy. Whether the late ack reports an error is not checked.
pub async fn late_ack_keeps_the_redelivery(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let short = SubscribeOptions::default().ack_deadline(SHORT_ACK_DEADLINE);
    let mut slow = subscribe(queue, &topic, "workers", short).await;
    let sent = Message::new("acked too late");
    publish(queue, &topic, sent.clone()).await;
    let expired = receive(&mut *slow, "the published message").await;
    // Joins after the slow member took the message, so a broker that pushes messages to its
    // members cannot have handed it to this one first.
    let mut other = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let again = receive(&mut *other, "the message after its ack deadline").await;
    assert_eq!(again.message.id, sent.id);
    assert_eq!(again.message.attempt, 2);

    let _ = bounded("the late ack", expired.ack()).await;
    nack(again, None).await;
    let third = receive(
        &mut *other,
        "the message after a nack; a late ack of its expired delivery must not remove it",
    )
    .await;
    assert_eq!(third.message.id, sent.id);
    assert_eq!(third.message.attempt, 3);
    ack(third).await;
    let mut members = vec![slow, other];
    expect_nothing_on_any(&mut members, "after the message was acked").await;
}

/// A nack that comes after the ack deadline, when the message was redelivered already, does
/// not bring back a second copy. Whether the late nack reports an error is not checked.
pub async fn late_nack_adds_no_copy(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let short = SubscribeOptions::default().ack_deadline(SHORT_ACK_DEADLINE);
    let mut slow = subscribe(queue, &topic, "workers", short).await;
    let sent = Message::new("nacked too late");
    publish(queue, &topic, sent.clone()).await;
    let expired = receive(&mut *slow, "the published message").await;
    let mut other = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let again = receive(&mut *other, "the message after its ack deadline").await;
    assert_eq!(again.message.id, sent.id);
    assert_eq!(again.message.attempt, 2);

    let _ = bounded("the late nack", expired.nack(None)).await;
    ack(again).await;
    let mut members = vec![slow, other];
    expect_nothing_on_any(
        &mut members,
        "after the redelivered copy was acked; the late nack must be ignored",
    )
    .await;
}

/// Payloads of 1 MiB arrive intact.
pub async fn large_payloads(queue: &dyn MessageQueue, prefix: &str) {
    const SIZE: usize = 1024 * 1024;
    let topic = format!("{prefix}.blobs");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let mut sent = Vec::new();
    for seed in 0..3usize {
        let payload: Vec<u8> = (0..SIZE)
            .map(|i| ((i * 31 + seed * 7) % 251) as u8)
            .collect();
        let message = Message::new(payload).with_header("seed", seed.to_string());
        publish(queue, &topic, message.clone()).await;
        sent.push(message);
    }
    let mut by_id: HashMap<String, Message> = sent.into_iter().map(|m| (m.id.clone(), m)).collect();
    for _ in 0..3 {
        let delivery = receive(&mut *consumer, "a 1 MiB message").await;
        let Some(expected) = by_id.remove(&delivery.message.id) else {
            panic!("unexpected or repeated message {}", delivery.message.id);
        };
        let got = &delivery.message.payload;
        if *got != expected.payload {
            let first_difference = got
                .iter()
                .zip(expected.payload.iter())
                .position(|(a, b)| a != b);
            panic!(
                "a 1 MiB payload arrived altered: {} bytes instead of {}, first difference at \
                 byte {first_difference:?}",
                got.len(),
                expected.payload.len(),
            );
        }
        assert_eq!(delivery.message.headers, expected.headers);
        ack(delivery).await;
    }
    expect_nothing(&mut consumer, "after the large messages were acked").await;
}

/// [`MANY_MESSAGES`] messages through four concurrent members of one group; see
/// [`many_messages_through_four_consumers_n`].
pub async fn many_messages_through_four_consumers(queue: &dyn MessageQueue, prefix: &str) {
    many_messages_through_four_consumers_n(queue, prefix, MANY_MESSAGES).await;
}

/// `count` messages through four concurrent members of one group: every message
/// is acked exactly once, none is lost, none comes back after its ack.
pub async fn many_messages_through_four_consumers_n(
    queue: &dyn MessageQueue,
    prefix: &str,
    count: usize,
) {
    let topic = format!("{prefix}.tasks");
    let mut members = Vec::new();
    for _ in 0..4 {
        members.push(subscribe(queue, &topic, "workers", SubscribeOptions::default()).await);
    }
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let done_tx = std::sync::Arc::new(done_tx);
    let mut tasks = tokio::task::JoinSet::new();
    for (member, mut consumer) in members.into_iter().enumerate() {
        let acked = std::sync::Arc::clone(&acked);
        let done_tx = std::sync::Arc::clone(&done_tx);
        let mut done_rx = done_rx.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            let mut stalled = false;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = done_rx.wait_for(|done| *done) => break,
                    next = timeout(RECEIVE_TIMEOUT, consumer.next()) => next,
                };
                let delivery = match next {
                    Ok(Ok(delivery)) => delivery,
                    Ok(Err(err)) => panic!("member {member}: next failed: {err}"),
                    Err(_) => {
                        stalled = true;
                        break;
                    }
                };
                ids.push(delivery.message.id.clone());
                ack(delivery).await;
                if acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= count {
                    done_tx.send_replace(true);
                }
            }
            (member, consumer, ids, stalled)
        });
    }

    let messages: Vec<Message> = (0..count).map(|i| Message::new(i.to_string())).collect();
    let sent: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
    // Publish in chunks, keeping at most `MAX_BACKLOG` messages waiting, as a server whose
    // workers keep up does; some brokers (moto) slow down with a long backlog.
    let mut published: usize = 0;
    let mut messages = messages.into_iter();
    loop {
        let chunk: Vec<Message> = messages.by_ref().take(PUBLISHERS * 8).collect();
        if chunk.is_empty() {
            break;
        }
        let stalled_at = Instant::now();
        while published.saturating_sub(acked.load(std::sync::atomic::Ordering::SeqCst))
            > MAX_BACKLOG
        {
            assert!(
                stalled_at.elapsed() < RECEIVE_TIMEOUT,
                "the members acked nothing for {RECEIVE_TIMEOUT:?} with {} messages waiting",
                published.saturating_sub(acked.load(std::sync::atomic::Ordering::SeqCst))
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        published += chunk.len();
        publish_concurrently(queue, &topic, chunk, PUBLISHERS).await;
    }

    let mut members = Vec::new();
    let mut received = HashSet::with_capacity(count);
    let mut duplicates = Vec::new();
    let mut stalled_members = Vec::new();
    let mut per_member = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (member, consumer, ids, stalled) = match joined {
            Ok(result) => result,
            Err(err) => panic!("a consumer task failed: {err}"),
        };
        per_member.push((member, ids.len()));
        if stalled {
            stalled_members.push(member);
        }
        for id in ids {
            if !received.insert(id.clone()) {
                duplicates.push(id);
            }
        }
        members.push(consumer);
    }
    per_member.sort_unstable();
    let missing = sent.iter().filter(|id| !received.contains(*id)).count();
    assert!(
        duplicates.is_empty() && missing == 0,
        "{count} messages through 4 members: {missing} never arrived, {} arrived twice \
         (e.g. {:?}); messages per member {per_member:?}; members that waited \
         {RECEIVE_TIMEOUT:?} in vain: {stalled_members:?}",
        duplicates.len(),
        duplicates.first(),
    );
    expect_nothing_on_any(&mut members, "after every message was acked").await;
}

/// A single member receives the messages of a topic in publish order.
pub async fn fifo_for_one_consumer(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let sent = publish_numbered(queue, &topic, 200).await;
    for (position, expected) in sent.iter().enumerate() {
        let delivery = receive(&mut *consumer, "the next message in publish order").await;
        assert_eq!(
            &delivery.message.id, expected,
            "message {position} out of order: got payload {:?}",
            delivery.message.payload
        );
        ack(delivery).await;
    }
    expect_nothing(&mut consumer, "after every message was acked").await;
}

/// Names outside 1 to 200 characters of `[A-Za-z0-9._-]` are rejected with
/// [`Error::InvalidName`] naming what was wrong (`topic` or `group`); a name of exactly 200
/// characters is accepted.
pub async fn invalid_names_rejected(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let too_long = "x".repeat(201);
    let bad = [
        "",
        "has space",
        "slash/inside",
        "colon:inside",
        "star*",
        "ünïcode",
        "new\nline",
        &too_long,
    ];
    for name in bad {
        let result = bounded("publish", queue.publish(name, Message::new("x"))).await;
        expect_invalid(result, "topic", name, "publish");
        let result = bounded(
            "subscribe",
            queue.subscribe(name, "workers", SubscribeOptions::default()),
        )
        .await;
        expect_invalid(result.map(|_| ()), "topic", name, "subscribe");
        let result = bounded(
            "subscribe",
            queue.subscribe(&topic, name, SubscribeOptions::default()),
        )
        .await;
        expect_invalid(result.map(|_| ()), "group", name, "subscribe");
    }

    let longest_topic = format!("{topic}.{}", "t".repeat(199 - topic.len()));
    let longest_group = "g".repeat(200);
    assert_eq!(longest_topic.len(), 200);
    let mut consumer = subscribe(
        queue,
        &longest_topic,
        &longest_group,
        SubscribeOptions::default(),
    )
    .await;
    let sent = Message::new("long names");
    publish(queue, &longest_topic, sent.clone()).await;
    let delivery = receive(
        &mut *consumer,
        "a message on a topic named with 200 characters",
    )
    .await;
    assert_eq!(delivery.message.id, sent.id);
    ack(delivery).await;
}

/// [`MessageQueue::delete_topic`] removes a topic with what its groups hold. A group `workers`
/// with one message nacked with a delay, one delivered and held, one never delivered, and a
/// group `audit` that nobody reads, are removed: the held delivery's consumer ends with
/// [`Error::Closed`] or receives nothing more; new subscriptions of both groups receive none of
/// the old messages, also past the end of the nack delay and after the old delivery and
/// consumer are dropped; a message published after the removal is delivered to them. Removing
/// a topic that never existed, or the same topic twice, is `Ok`; an invalid name is
/// [`Error::InvalidName`].
pub async fn delete_topic_removes_its_messages(queue: &dyn MessageQueue, prefix: &str) {
    let topic = format!("{prefix}.tasks");
    let mut old = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    drop(subscribe(queue, &topic, "audit", SubscribeOptions::default()).await);
    let sent = publish_numbered(queue, &topic, 3).await;
    // Standard SQS queues do not keep order: whichever comes first is nacked, the next held.
    let nacked = receive(&mut *old, "a message to nack with a delay").await;
    let nacked_at = Instant::now();
    let nacked_id = nacked.message.id.clone();
    nack(nacked, Some(REMOVED_NACK_DELAY)).await;
    let held = receive(&mut *old, "a message to hold").await;
    if held.message.id == nacked_id {
        let waited = nacked_at.elapsed();
        assert!(
            waited >= REMOVED_NACK_DELAY,
            "redelivered {waited:?} after a nack with a delay of {REMOVED_NACK_DELAY:?}"
        );
    }

    delete_topic(queue, &topic).await;
    match timeout(QUIET_PERIOD, old.next()).await {
        Err(_) | Ok(Err(Error::Closed)) => {}
        Ok(Ok(delivery)) => panic!(
            "a consumer of the removed topic received message {} (attempt {})",
            delivery.message.id, delivery.message.attempt
        ),
        Ok(Err(err)) => panic!(
            "a consumer of the removed topic must end with Error::Closed or receive nothing, \
             got: {err:?}"
        ),
    }

    let mut fresh = vec![
        subscribe(queue, &topic, "workers", SubscribeOptions::default()).await,
        subscribe(queue, &topic, "audit", SubscribeOptions::default()).await,
    ];
    let watch_until = nacked_at + REMOVED_WATCH;
    match tokio::time::timeout_at(watch_until, next_from_any(&mut fresh)).await {
        Err(_) => {}
        Ok((index, Ok(delivery))) => panic!(
            "group {} of the topic created again received message {} (attempt {}); published \
             before the removal: {}",
            ["workers", "audit"][index],
            delivery.message.id,
            delivery.message.attempt,
            sent.contains(&delivery.message.id),
        ),
        Ok((index, Err(err))) => panic!("member {index} of the topic created again failed: {err}"),
    }
    // What the old consumer held is settled as nothing: neither the abandoned delivery nor the
    // dropped consumer brings a message back.
    drop(held);
    drop(old);
    expect_nothing_on_any(
        &mut fresh,
        "after the old delivery and consumer of the removed topic were dropped",
    )
    .await;

    let after = Message::new("published after the removal");
    publish(queue, &topic, after.clone()).await;
    for (index, consumer) in fresh.iter_mut().enumerate() {
        let delivery = receive(&mut **consumer, "the message published after the removal").await;
        assert_eq!(
            delivery.message,
            after,
            "group {} of the topic created again must receive the new message unchanged",
            ["workers", "audit"][index]
        );
        ack(delivery).await;
    }
    expect_nothing_on_any(&mut fresh, "after the new message was acked").await;

    delete_topic(queue, &format!("{prefix}.never")).await;
    delete_topic(queue, &topic).await;
    delete_topic(queue, &topic).await;
    let result = bounded("delete_topic", queue.delete_topic("has space")).await;
    expect_invalid(result, "topic", "has space", "delete_topic");
}

/// With the broker stopped, `publish` fails with [`Error::Unavailable`] within `bound` (the
/// queue's publish timeout) plus a margin for the machine's noise, instead of hanging; once
/// the broker is back, publishing and receiving work again without a new queue.
pub async fn publish_while_down_fails_within_bound(
    queue: &dyn MessageQueue,
    broker: &dyn BrokerControl,
    bound: Duration,
    prefix: &str,
) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let before = Message::new("before the stop");
    publish(queue, &topic, before.clone()).await;
    let delivery = receive(&mut *consumer, "the message published while the broker ran").await;
    assert_eq!(delivery.message.id, before.id);
    ack(delivery).await;

    broker.stop().await;
    let margin = RECEIVE_TIMEOUT;
    let started = Instant::now();
    let result = timeout(
        bound + margin,
        queue.publish(&topic, Message::new("while down")),
    )
    .await;
    let waited = started.elapsed();
    broker.start().await;
    match result {
        Err(_) => panic!(
            "publish with the broker down did not return within {:?} (bound {bound:?})",
            bound + margin
        ),
        Ok(Ok(())) => panic!("publish with the broker down reported success"),
        Ok(Err(Error::Unavailable(message))) => {
            tracing::info!(?waited, %message, "publish failed as it should");
        }
        Ok(Err(other)) => {
            panic!("publish with the broker down must fail with Error::Unavailable, got {other:?}")
        }
    }

    let after = Message::new("after the restart");
    publish(queue, &topic, after.clone()).await;
    loop {
        let delivery = receive(&mut *consumer, "the message published after the restart").await;
        let id = delivery.message.id.clone();
        ack(delivery).await;
        if id == after.id {
            break;
        }
    }
}

/// The broker restarts under a waiting consumer: the consumer and the publisher reconnect by
/// themselves. What was published before the stop arrives too when `keeps_messages` (the
/// broker persists them across a restart); what was published after always does.
pub async fn reconnects_after_restart(
    queue: &dyn MessageQueue,
    broker: &dyn BrokerControl,
    keeps_messages: bool,
    prefix: &str,
) {
    let topic = format!("{prefix}.tasks");
    let mut consumer = subscribe(queue, &topic, "workers", SubscribeOptions::default()).await;
    let first = Message::new("first");
    publish(queue, &topic, first.clone()).await;
    let delivery = receive(&mut *consumer, "the first message").await;
    assert_eq!(delivery.message.id, first.id);
    ack(delivery).await;
    let queued = Message::new("queued before the restart");
    publish(queue, &topic, queued.clone()).await;

    // The consumer waits through the restart.
    broker.stop().await;
    let waiting = tokio::spawn(async move {
        let mut seen = Vec::new();
        let deadline = Instant::now() + 3 * RECEIVE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, consumer.next()).await {
                Ok(Ok(delivery)) => {
                    let id = delivery.message.id.clone();
                    // An ack across the restart may retry up to the backend's own publish
                    // bound (10 s by default) before failing: wait past it, not for as long.
                    let acked = match timeout(2 * RECEIVE_TIMEOUT, delivery.ack()).await {
                        Ok(acked) => acked,
                        Err(_) => panic!("an ack across the restart did not return within 20 s"),
                    };
                    if let Err(err) = acked {
                        tracing::info!(error = %err, "ack across the restart failed");
                        continue;
                    }
                    seen.push(id);
                    return (consumer, seen);
                }
                Ok(Err(err)) => panic!("next across a broker restart failed: {err}"),
                Err(_) => return (consumer, seen),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.start().await;

    let after = Message::new("published after the restart");
    publish(queue, &topic, after.clone()).await;
    let (mut consumer, mut seen) = match waiting.await {
        Ok(result) => result,
        Err(err) => panic!("the waiting consumer failed: {err}"),
    };
    let mut wanted: HashSet<String> = HashSet::from([after.id.clone()]);
    if keeps_messages {
        wanted.insert(queued.id.clone());
    }
    for id in &seen {
        wanted.remove(id);
    }
    while !wanted.is_empty() {
        let delivery = receive(
            &mut *consumer,
            "the messages of before and after the restart",
        )
        .await;
        let id = delivery.message.id.clone();
        ack(delivery).await;
        wanted.remove(&id);
        seen.push(id);
    }
    let published = [first.id, queued.id, after.id];
    for id in &seen {
        assert!(
            published.contains(id),
            "received a message never published: {id}"
        );
    }
}

fn expect_invalid(result: Result<(), Error>, expected_what: &str, name: &str, call: &str) {
    match result {
        Err(Error::InvalidName { what, .. }) if what == expected_what => {}
        Err(err) => panic!(
            "{call} with {expected_what} {name:?}: expected Error::InvalidName for the \
             {expected_what}, got: {err:?}"
        ),
        Ok(()) => panic!("{call} accepted the invalid {expected_what} name {name:?}"),
    }
}

/// Awaits `future` for at most [`RECEIVE_TIMEOUT`]; panics naming `what` when it takes longer.
pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match timeout(RECEIVE_TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not return within {RECEIVE_TIMEOUT:?}"),
    }
}

/// How many publishes [`many_messages_through_four_consumers`] keeps in flight, as the many
/// tasks of a busy server do; a broker that confirms each publish after a disk sync would take
/// minutes for them one at a time.
pub const PUBLISHERS: usize = 32;

/// How many published messages [`many_messages_through_four_consumers`] lets wait for the
/// members at most.
pub const MAX_BACKLOG: usize = 2_000;

/// Publishes `messages` on `topic` with up to `in_flight` publishes at once; panics on the
/// first failure.
pub async fn publish_concurrently(
    queue: &dyn MessageQueue,
    topic: &str,
    messages: Vec<Message>,
    in_flight: usize,
) {
    let mut messages = messages.into_iter();
    let mut running: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>> = Vec::new();
    loop {
        while running.len() < in_flight.max(1) {
            let Some(message) = messages.next() else {
                break;
            };
            running.push(Box::pin(publish(queue, topic, message)));
        }
        if running.is_empty() {
            return;
        }
        std::future::poll_fn(|cx| {
            let before = running.len();
            running.retain_mut(|publishing| publishing.as_mut().poll(cx).is_pending());
            if running.len() < before {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// Joins `group` on `topic`; panics on failure.
pub async fn subscribe(
    queue: &dyn MessageQueue,
    topic: &str,
    group: &str,
    options: SubscribeOptions,
) -> Box<dyn Consumer> {
    let what = format!("subscribing to `{topic}` as `{group}`");
    match bounded(&what, queue.subscribe(topic, group, options)).await {
        Ok(consumer) => consumer,
        Err(err) => panic!("{what} failed: {err}"),
    }
}

/// Removes `topic`; panics on failure.
pub async fn delete_topic(queue: &dyn MessageQueue, topic: &str) {
    let what = format!("deleting topic `{topic}`");
    if let Err(err) = bounded(&what, queue.delete_topic(topic)).await {
        panic!("{what} failed: {err}");
    }
}

/// Publishes `message` on `topic`; panics on failure.
pub async fn publish(queue: &dyn MessageQueue, topic: &str, message: Message) {
    let what = format!("publishing on `{topic}`");
    if let Err(err) = bounded(&what, queue.publish(topic, message)).await {
        panic!("{what} failed: {err}");
    }
}

/// Publishes `count` messages with payloads `0`, `1`, ... and returns their ids in order.
pub async fn publish_numbered(queue: &dyn MessageQueue, topic: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let message = Message::new(i.to_string()).with_header("seq", i.to_string());
        ids.push(message.id.clone());
        publish(queue, topic, message).await;
    }
    ids
}

/// Waits for the next delivery; panics, naming the `expected` message, when none arrives within
/// [`RECEIVE_TIMEOUT`] or `next` fails.
pub async fn receive(consumer: &mut dyn Consumer, expected: &str) -> Delivery {
    match timeout(RECEIVE_TIMEOUT, consumer.next()).await {
        Ok(Ok(delivery)) => delivery,
        Ok(Err(err)) => panic!("waiting for {expected}: next failed: {err}"),
        Err(_) => panic!("waiting for {expected}: nothing arrived within {RECEIVE_TIMEOUT:?}"),
    }
}

/// Waits for the next delivery on any of `consumers`; returns the index of the one that got it.
pub async fn receive_from_any(
    consumers: &mut [Box<dyn Consumer>],
    expected: &str,
) -> (usize, Delivery) {
    match timeout(RECEIVE_TIMEOUT, next_from_any(consumers)).await {
        Ok((index, Ok(delivery))) => (index, delivery),
        Ok((index, Err(err))) => panic!("waiting for {expected}: member {index} failed: {err}"),
        Err(_) => panic!("waiting for {expected}: nothing arrived within {RECEIVE_TIMEOUT:?}"),
    }
}

/// Panics if `consumer` receives anything within [`QUIET_PERIOD`].
pub async fn expect_nothing(consumer: &mut Box<dyn Consumer>, when: &str) {
    expect_nothing_on_any(std::slice::from_mut(consumer), when).await;
}

/// Panics if any of `consumers` receives anything within [`QUIET_PERIOD`].
pub async fn expect_nothing_on_any(consumers: &mut [Box<dyn Consumer>], when: &str) {
    match timeout(QUIET_PERIOD, next_from_any(consumers)).await {
        Err(_) => {}
        Ok((index, Ok(delivery))) => panic!(
            "{when}: member {index} unexpectedly received message {} (attempt {}, payload {:?})",
            delivery.message.id,
            delivery.message.attempt,
            truncated(&delivery.message.payload),
        ),
        Ok((index, Err(err))) => panic!("{when}: member {index} failed: {err}"),
    }
}

/// The first result of `next` among `consumers`; the other calls are cancelled.
async fn next_from_any(consumers: &mut [Box<dyn Consumer>]) -> (usize, Result<Delivery, Error>) {
    let mut pending: Vec<_> = consumers.iter_mut().map(|c| c.next()).collect();
    std::future::poll_fn(|cx| {
        for (index, next) in pending.iter_mut().enumerate() {
            if let Poll::Ready(result) = next.as_mut().poll(cx) {
                return Poll::Ready((index, result));
            }
        }
        Poll::Pending
    })
    .await
}

fn truncated(payload: &Bytes) -> Bytes {
    payload.slice(..payload.len().min(64))
}

fn assert_same_ids(sent: &[String], received: &HashSet<String>, what: &str) {
    let missing: Vec<&String> = sent.iter().filter(|id| !received.contains(*id)).collect();
    let sent: HashSet<&String> = sent.iter().collect();
    let unexpected: Vec<&String> = received.iter().filter(|id| !sent.contains(id)).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{what} {} messages of {} published: missing {missing:?}, not published here \
         {unexpected:?}",
        received.len(),
        sent.len(),
    );
}

async fn ack(delivery: Delivery) {
    let id = delivery.message.id.clone();
    if let Err(err) = bounded("ack", delivery.ack()).await {
        panic!("acking message {id} failed: {err}");
    }
}

async fn nack(delivery: Delivery, delay: Option<Duration>) {
    let id = delivery.message.id.clone();
    if let Err(err) = bounded("nack", delivery.nack(delay)).await {
        panic!("nacking message {id} failed: {err}");
    }
}
