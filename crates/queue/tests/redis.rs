//! The conformance suite against a real Redis server.
//!
//! The suite runs against `DEPLOYD_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`); the
//! fault cases start their own `redis-server` on a free port (with an append-only file, so
//! that it keeps its streams across a kill). Both fail, never skip, when Redis is missing.
//! `cargo xtask e2e` starts Redis when it is not running.

use std::time::Duration;

use deployd_queue::Bounds;
use deployd_queue::redis::{RedisOptions, RedisQueue};
use deployd_queue::testing::{self, BrokerProcess};

fn url() -> String {
    std::env::var("DEPLOYD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// The suite's topics are used once: Redis forgets them after a while.
fn options(url: &str) -> RedisOptions {
    let mut options = RedisOptions::new(url);
    options.key_expiry = Some(Duration::from_secs(600));
    options
}

async fn queue() -> RedisQueue {
    let url = url();
    match RedisQueue::connect(options(&url)).await {
        Ok(queue) => queue,
        Err(err) => panic!(
            "cannot reach Redis at {url} (set DEPLOYD_TEST_REDIS_URL, or run `cargo xtask e2e`, \
             which starts it): {err}"
        ),
    }
}

deployd_queue::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    queue = queue().await
);

const BOUND: Duration = Duration::from_secs(2);

/// A private `redis-server` on a free port, with its data in a temporary folder.
async fn private_server() -> (BrokerProcess, RedisQueue, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let port = testing::free_port();
    let port_text = port.to_string();
    let dir_text = dir.path().to_string_lossy().into_owned();
    let server = BrokerProcess::start(
        "redis-server",
        &[
            "--port",
            &port_text,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            &dir_text,
        ],
        port,
    )
    .await;
    let options = options(&format!("redis://127.0.0.1:{port}/0"))
        .bounds(Bounds::default().publish_timeout(BOUND));
    let queue = RedisQueue::connect(options)
        .await
        .expect("connecting to the private redis-server");
    (server, queue, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_down_fails_within_bound() {
    let (server, queue, _dir) = private_server().await;
    let prefix = testing::unique_prefix("down");
    testing::publish_while_down_fails_within_bound(&queue, &server, BOUND, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_restart() {
    let (server, queue, _dir) = private_server().await;
    let prefix = testing::unique_prefix("restart");
    testing::reconnects_after_restart(&queue, &server, true, &prefix).await;
}

#[tokio::test]
async fn connect_fails_within_bound_when_nothing_listens() {
    let port = testing::free_port();
    let options = RedisOptions::new(format!("redis://127.0.0.1:{port}/0"))
        .bounds(Bounds::default().connect_timeout(Duration::from_millis(500)));
    let started = std::time::Instant::now();
    let result = RedisQueue::connect(options).await;
    assert!(
        matches!(result, Err(deployd_queue::Error::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Every key of a removed topic is gone from Redis (its stream, its groups' retry streams and
/// delay sets), also after its old consumer and delivery are dropped; another topic whose name
/// starts with the same characters keeps its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_leaves_no_key() {
    use deployd_queue::{Message, SubscribeOptions};

    let queue = queue().await;
    let prefix = testing::unique_prefix("delete_keys");
    let topic = format!("{prefix}.tasks");
    let neighbour = format!("{prefix}.tasks2");
    let mut consumer =
        testing::subscribe(&queue, &topic, "workers", SubscribeOptions::default()).await;
    let _neighbour =
        testing::subscribe(&queue, &neighbour, "workers", SubscribeOptions::default()).await;
    for i in 0..3 {
        testing::publish(&queue, &topic, Message::new(i.to_string())).await;
    }
    testing::publish(&queue, &neighbour, Message::new("stays")).await;
    let delayed = testing::receive(&mut *consumer, "a message to delay").await;
    delayed
        .nack(Some(Duration::from_secs(60)))
        .await
        .expect("nack with a delay");
    let retried = testing::receive(&mut *consumer, "a message to nack").await;
    retried.nack(None).await.expect("nack");
    let held = testing::receive(&mut *consumer, "a message to hold").await;
    let pattern = |topic: &str| format!("deployd:{{{topic}}}*");
    let mut redis = redis::Client::open(url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to Redis");
    let before: Vec<String> = scan(&mut redis, &pattern(&topic)).await;
    assert!(
        before.iter().any(|key| key.contains(":delay:")) && before.len() >= 3,
        "the topic's stream, retry stream and delay set exist before: {before:?}"
    );

    testing::delete_topic(&queue, &topic).await;
    drop(held);
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = scan(&mut redis, &pattern(&topic)).await;
    assert!(
        after.is_empty(),
        "keys left by the removed topic: {after:?}"
    );
    let neighbour_keys = scan(&mut redis, &pattern(&neighbour)).await;
    assert!(
        !neighbour_keys.is_empty(),
        "the keys of `{neighbour}` must stay"
    );
}

async fn scan(redis: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await
            .expect("SCAN");
        keys.extend(page);
        cursor = next;
        if cursor == 0 {
            return keys;
        }
    }
}
