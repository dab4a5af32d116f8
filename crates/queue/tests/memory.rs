//! The conformance suite and the memory-specific behaviour of [`MemoryQueue`].

use std::time::Duration;

use deployd_queue::memory::MemoryQueue;
use deployd_queue::testing::{self, expect_nothing, publish, receive, subscribe};
use deployd_queue::{Error, Message, MessageQueue, SubscribeOptions};
use tokio::time::{Instant, timeout};

// Paused time: the deadline and delay cases take no wall-clock time.
deployd_queue::conformance_tests!(
    #[tokio::test(start_paused = true)]
    queue = MemoryQueue::new()
);

/// The whole suite in real time on several threads, so that members really race.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_in_real_time_on_threads() {
    let queue = MemoryQueue::new();
    testing::run_all(&queue, &testing::unique_prefix("threads")).await;
}

const TOPIC: &str = "deployd.app.svc";

fn options() -> SubscribeOptions {
    SubscribeOptions::default()
}

#[tokio::test]
async fn close_wakes_waiting_consumers() {
    let queue = MemoryQueue::new();
    let mut waiting = Vec::new();
    for group in ["a", "a", "b"] {
        let mut consumer = subscribe(&queue, TOPIC, group, options()).await;
        waiting.push(tokio::spawn(async move { consumer.next().await }));
    }
    // Let every consumer reach its wait.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!queue.is_closed());
    queue.close();
    assert!(queue.is_closed());
    for task in waiting {
        let result = timeout(Duration::from_secs(10), task)
            .await
            .expect("close must wake the consumer")
            .expect("the consumer task must not panic");
        assert!(
            matches!(result, Err(Error::Closed)),
            "expected Error::Closed, got {result:?}"
        );
    }
}

#[tokio::test]
async fn closed_queue_refuses_everything_but_settling() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    publish(&queue, TOPIC, Message::new("held")).await;
    publish(&queue, TOPIC, Message::new("left behind")).await;
    let held = receive(&mut *consumer, "the first message").await;

    queue.close();
    queue.close();
    assert!(matches!(consumer.next().await, Err(Error::Closed)));
    assert!(matches!(
        queue.publish(TOPIC, Message::new("late")).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        queue.publish("brand.new.topic", Message::new("late")).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        queue.subscribe(TOPIC, "workers", options()).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        queue
            .subscribe("brand.new.topic", "workers", options())
            .await,
        Err(Error::Closed)
    ));
    held.ack()
        .await
        .expect("acking after close settles the delivery");
}

#[tokio::test]
async fn clones_share_the_queue() {
    let queue = MemoryQueue::new();
    let clone = queue.clone();
    let mut consumer = subscribe(&clone, TOPIC, "workers", options()).await;
    let sent = Message::new("via the original");
    publish(&queue, TOPIC, sent.clone()).await;
    let delivery = receive(&mut *consumer, "the message published on the other handle").await;
    assert_eq!(delivery.message, sent);
    delivery.ack().await.unwrap();
    clone.close();
    assert!(queue.is_closed());
}

#[tokio::test]
async fn usable_as_a_trait_object() {
    let queue: std::sync::Arc<dyn MessageQueue> = std::sync::Arc::new(MemoryQueue::new());
    let mut consumer = subscribe(&*queue, TOPIC, "workers", options()).await;
    publish(&*queue, TOPIC, Message::new("dyn")).await;
    let delivery = receive(&mut *consumer, "a message through Arc<dyn MessageQueue>").await;
    assert_eq!(delivery.message.payload, "dyn");
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn messages_published_before_any_group_are_dropped() {
    let queue = MemoryQueue::new();
    publish(&queue, TOPIC, Message::new("nobody listens")).await;
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    let sent = Message::new("somebody listens");
    publish(&queue, TOPIC, sent.clone()).await;
    let delivery = receive(&mut *consumer, "the message published after the group").await;
    assert_eq!(delivery.message.id, sent.id);
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn a_group_keeps_messages_while_it_has_no_member() {
    let queue = MemoryQueue::new();
    let first = subscribe(&queue, TOPIC, "workers", options()).await;
    drop(first);
    let sent = Message::new("kept for the group");
    publish(&queue, TOPIC, sent.clone()).await;
    let mut second = subscribe(&queue, TOPIC, "workers", options()).await;
    let delivery = receive(&mut *second, "the message kept while the group was empty").await;
    assert_eq!(delivery.message.id, sent.id);
    assert_eq!(delivery.message.attempt, 1);
    delivery.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn nack_delay_is_exact_in_paused_time() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    publish(&queue, TOPIC, Message::new("later")).await;
    let delivery = receive(&mut *consumer, "the message").await;
    let delay = Duration::from_secs(5);
    let nacked_at = Instant::now();
    delivery.nack(Some(delay)).await.unwrap();

    let early = timeout(delay - Duration::from_millis(1), consumer.next()).await;
    assert!(early.is_err(), "redelivered before the delay: {early:?}");
    let delivery = receive(&mut *consumer, "the delayed message").await;
    assert_eq!(nacked_at.elapsed(), delay);
    assert_eq!(delivery.message.attempt, 2);
    delivery.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn delayed_messages_come_back_in_due_order() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    let ids = testing::publish_numbered(&queue, TOPIC, 3).await;
    let delays = [3, 1, 2];
    for delay in delays {
        let delivery = receive(&mut *consumer, "a message to delay").await;
        delivery
            .nack(Some(Duration::from_secs(delay)))
            .await
            .unwrap();
    }
    let start = Instant::now();
    for (index, expected_at) in [(1, 1), (2, 2), (0, 3)] {
        let delivery = receive(&mut *consumer, "a delayed message").await;
        assert_eq!(delivery.message.id, ids[index]);
        assert_eq!(start.elapsed(), Duration::from_secs(expected_at));
        delivery.ack().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn ack_deadline_is_exact_in_paused_time() {
    let queue = MemoryQueue::new();
    let deadline = Duration::from_secs(30);
    let mut slow = subscribe(&queue, TOPIC, "workers", options().ack_deadline(deadline)).await;
    let mut other = subscribe(&queue, TOPIC, "workers", options()).await;
    publish(&queue, TOPIC, Message::new("slow")).await;
    let delivered_at = Instant::now();
    let expired = receive(&mut *slow, "the message").await;

    let early = timeout(deadline - Duration::from_millis(1), other.next()).await;
    assert!(early.is_err(), "redelivered before the deadline: {early:?}");
    let again = receive(&mut *other, "the message after the deadline").await;
    assert_eq!(delivered_at.elapsed(), deadline);
    assert_eq!(again.message.attempt, 2);

    // The expired delivery no longer settles anything.
    expired.ack().await.unwrap();
    again.nack(None).await.unwrap();
    let third = receive(&mut *other, "the message after a nack").await;
    assert_eq!(third.message.attempt, 3);
    third.ack().await.unwrap();
    expect_nothing(&mut other, "after the ack").await;
}

/// Two members wait with no timer; the one that takes the message holds it. The other must
/// notice the ack deadline that started while it slept, and take the message back then.
#[tokio::test(start_paused = true)]
async fn waiting_member_notices_a_new_deadline() {
    let queue = MemoryQueue::new();
    let deadline = Duration::from_secs(2);
    let mut members = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let mut consumer =
            subscribe(&queue, TOPIC, "workers", options().ack_deadline(deadline)).await;
        members.spawn(async move {
            let delivery = consumer.next().await;
            (consumer, delivery)
        });
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let sent = Message::new("held past its deadline");
    publish(&queue, TOPIC, sent.clone()).await;
    let start = Instant::now();
    let (_holder, held) = testing::bounded("the first member", members.join_next())
        .await
        .unwrap()
        .unwrap();
    let held = held.unwrap();
    assert_eq!(
        (held.message.id.as_str(), held.message.attempt),
        (sent.id.as_str(), 1)
    );
    let (_other, again) = timeout(Duration::from_secs(10), members.join_next())
        .await
        .expect("the other member must wake at the holder's ack deadline")
        .unwrap()
        .unwrap();
    let again = again.unwrap();
    assert_eq!(
        (again.message.id.as_str(), again.message.attempt),
        (sent.id.as_str(), 2)
    );
    assert_eq!(start.elapsed(), deadline);
    again.ack().await.unwrap();
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn waiting_member_notices_an_earlier_delay() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    let mut nacker = subscribe(&queue, TOPIC, "workers", options()).await;
    let ids = testing::publish_numbered(&queue, TOPIC, 2).await;
    let long = receive(&mut *nacker, "the first message").await;
    let short = receive(&mut *nacker, "the second message").await;
    long.nack(Some(Duration::from_secs(60))).await.unwrap();

    // The consumer goes to sleep until the 60 s delay ends...
    let waiting = tokio::spawn(async move {
        let delivery = consumer.next().await;
        (consumer, delivery)
    });
    tokio::task::yield_now().await;
    // ... and must wake earlier for a 1 s delay added while it sleeps.
    let start = Instant::now();
    short.nack(Some(Duration::from_secs(1))).await.unwrap();
    let (_consumer, delivery) = testing::bounded("the waiting member", waiting)
        .await
        .unwrap();
    let delivery = delivery.unwrap();
    assert_eq!(delivery.message.id, ids[1]);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn cancelled_next_loses_nothing() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    for _ in 0..3 {
        let cancelled = timeout(Duration::from_millis(1), consumer.next()).await;
        assert!(cancelled.is_err());
    }
    let sent = Message::new("after cancelled waits");
    publish(&queue, TOPIC, sent.clone()).await;
    let delivery = receive(&mut *consumer, "the message").await;
    assert_eq!(delivery.message, sent);
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn settling_after_the_consumer_is_dropped_is_ignored() {
    let queue = MemoryQueue::new();
    let mut doomed = subscribe(&queue, TOPIC, "workers", options()).await;
    let sent = Message::new("outlives its consumer");
    publish(&queue, TOPIC, sent.clone()).await;
    let stale = receive(&mut *doomed, "the message").await;
    drop(doomed);
    let mut survivor = subscribe(&queue, TOPIC, "workers", options()).await;
    let again = receive(&mut *survivor, "the redelivered message").await;
    assert_eq!(again.message.attempt, 2);
    stale.ack().await.unwrap();
    again.nack(None).await.unwrap();
    let third = receive(&mut *survivor, "the message after a nack").await;
    assert_eq!(third.message.id, sent.id);
    assert_eq!(third.message.attempt, 3);
    third.ack().await.unwrap();
}

#[tokio::test]
async fn redeliveries_go_before_new_messages() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
    let ids = testing::publish_numbered(&queue, TOPIC, 3).await;
    let first = receive(&mut *consumer, "the first message").await;
    first.nack(None).await.unwrap();
    let order: Vec<(String, u32)> = {
        let mut order = Vec::new();
        for _ in 0..3 {
            let delivery = receive(&mut *consumer, "a message").await;
            order.push((delivery.message.id.clone(), delivery.message.attempt));
            delivery.ack().await.unwrap();
        }
        order
    };
    assert_eq!(
        order,
        vec![
            (ids[0].clone(), 2),
            (ids[1].clone(), 1),
            (ids[2].clone(), 1)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn huge_deadline_and_delay_do_not_overflow() {
    let queue = MemoryQueue::new();
    let mut consumer = subscribe(
        &queue,
        TOPIC,
        "workers",
        options().ack_deadline(Duration::MAX),
    )
    .await;
    publish(&queue, TOPIC, Message::new("forever")).await;
    let delivery = receive(&mut *consumer, "the message").await;
    delivery.nack(Some(Duration::MAX)).await.unwrap();
    expect_nothing(&mut consumer, "after a nack with an endless delay").await;
}

/// Each group of a topic has its own members: a message waiting in one group wakes only that
/// group's members, and a member of another group does not see it.
#[tokio::test]
async fn groups_wake_independently() {
    let queue = MemoryQueue::new();
    let mut a = subscribe(&queue, TOPIC, "a", options()).await;
    let mut b = subscribe(&queue, TOPIC, "b", options()).await;
    let waiting_b = tokio::spawn(async move {
        let delivery = b.next().await;
        (b, delivery)
    });
    tokio::task::yield_now().await;
    publish(&queue, TOPIC, Message::new("both")).await;
    let from_a = receive(&mut *a, "the message in group a").await;
    let (_b, from_b) = testing::bounded("the member of group b", waiting_b)
        .await
        .unwrap();
    assert_eq!(from_a.message.id, from_b.unwrap().message.id);
    from_a.ack().await.unwrap();
}

/// A dropped member hands back several messages at once: every waiting member must be woken
/// for one, not only the first.
#[tokio::test(start_paused = true)]
async fn dropped_member_wakes_every_waiting_member() {
    let queue = MemoryQueue::new();
    let mut holder = subscribe(&queue, TOPIC, "workers", options()).await;
    let ids = testing::publish_numbered(&queue, TOPIC, 2).await;
    for _ in 0..ids.len() {
        std::mem::forget(receive(&mut *holder, "a message to hold").await);
    }
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..ids.len() {
        let mut consumer = subscribe(&queue, TOPIC, "workers", options()).await;
        waiting.spawn(async move {
            let delivery = consumer.next().await;
            (consumer, delivery)
        });
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    drop(holder);
    let mut redelivered = Vec::new();
    while let Some(joined) = testing::bounded("a waiting member", waiting.join_next()).await {
        let (_consumer, delivery) = joined.unwrap();
        let delivery = delivery.unwrap();
        assert_eq!(delivery.message.attempt, 2);
        redelivered.push(delivery.message.id.clone());
        delivery.ack().await.unwrap();
    }
    redelivered.sort();
    let mut expected = ids;
    expected.sort();
    assert_eq!(redelivered, expected);
}
