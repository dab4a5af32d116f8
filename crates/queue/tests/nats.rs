//! The conformance suite against a real NATS server with JetStream.
//!
//! The suite runs against `DEPLOYD_TEST_NATS_URL` (default `nats://127.0.0.1:4222`); the fault
//! cases start their own `nats-server -js` on a free port, with its store in a temporary
//! folder, and kill and restart it. Both fail, never skip, when NATS is missing;
//! `cargo xtask e2e` starts NATS when it is not running.

use std::time::Duration;

use deployd_queue::Bounds;
use deployd_queue::nats::{NatsOptions, NatsQueue};
use deployd_queue::testing::{self, BrokerProcess};

fn url() -> String {
    std::env::var("DEPLOYD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The suite's groups are used once: the server forgets them after a while. They live in a
/// stream of their own, not in deployd's default one: with the suite on that stream, NATS 2.9
/// once took 6.6 s to answer a deployd's stream lookup right after the suite (while it was
/// still busy with the suite's 100,000 messages and expiring groups), and the e2e scenario that
/// followed failed.
fn options(url: String) -> NatsOptions {
    let mut options = NatsOptions::new(url);
    options.stream_prefix = "deployd-conformance".into();
    options.group_expiry = Some(Duration::from_secs(600));
    options
}

async fn connect(options: NatsOptions) -> NatsQueue {
    match NatsQueue::connect(options).await {
        Ok(queue) => queue,
        Err(err) => panic!(
            "cannot reach NATS (set DEPLOYD_TEST_NATS_URL, or run `cargo xtask e2e`, which \
             starts it): {err}"
        ),
    }
}

deployd_queue::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    queue = connect(options(url())).await
);

const BOUND: Duration = Duration::from_secs(2);

async fn private_server() -> (BrokerProcess, NatsQueue, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let port = testing::free_port();
    let port_text = port.to_string();
    let dir_text = dir.path().to_string_lossy().into_owned();
    let server = BrokerProcess::start(
        "nats-server",
        &["-a", "127.0.0.1", "-p", &port_text, "-js", "-sd", &dir_text],
        port,
    )
    .await;
    let options = NatsOptions::new(format!("nats://127.0.0.1:{port}"))
        .bounds(Bounds::default().publish_timeout(BOUND));
    let queue = connect(options).await;
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

/// A server list whose first entry is a dead port: the client goes on to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_list_connects_past_a_dead_entry() {
    let queue = connect(options(format!("nats://127.0.0.1:1,{}", url()))).await;
    testing::round_trip(&queue, &testing::unique_prefix("server_list")).await;
}

/// The credentials of a list's entries (user info, percent-encoded, on an entry without a
/// scheme too) are the ones the client authenticates with; a wrong password is refused and not
/// shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_list_authenticates_with_the_credentials_of_its_entries() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let port = testing::free_port();
    let port_text = port.to_string();
    let dir_text = dir.path().to_string_lossy().into_owned();
    let _server = BrokerProcess::start(
        "nats-server",
        &[
            "-a",
            "127.0.0.1",
            "-p",
            &port_text,
            "-js",
            "-sd",
            &dir_text,
            "--user",
            "deployd",
            "--pass",
            "p@ss w0rd",
        ],
        port,
    )
    .await;
    let list = format!("nats://127.0.0.1:1,deployd:p%40ss%20w0rd@127.0.0.1:{port}");
    let queue = connect(options(list)).await;
    testing::round_trip(&queue, &testing::unique_prefix("authenticated_list")).await;

    let list =
        format!("nats://deployd:wrong-secret@127.0.0.1:1,deployd:wrong-secret@127.0.0.1:{port}");
    let err = match NatsQueue::connect(options(list.clone())).await {
        Ok(_) => panic!("connected with a wrong password"),
        Err(err) => err,
    };
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("wrong-secret"), "{shown}");
    assert!(shown.contains("authorization violation"), "{shown}");
}

/// A removed topic leaves no consumer filtered on its subject and no message on it in the
/// stream, whichever process created the consumers; another topic keeps its consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_leaves_no_consumer_and_no_message() {
    use deployd_queue::{Message, SubscribeOptions};
    use futures::StreamExt;

    let queue = connect(options(url())).await;
    let other_process = connect(options(url())).await;
    let prefix = testing::unique_prefix("delete_consumers");
    let topic = format!("{prefix}.tasks");
    let neighbour = format!("{prefix}.tasks2");
    let mut consumer =
        testing::subscribe(&queue, &topic, "workers", SubscribeOptions::default()).await;
    let _other =
        testing::subscribe(&other_process, &topic, "audit", SubscribeOptions::default()).await;
    let _neighbour =
        testing::subscribe(&queue, &neighbour, "workers", SubscribeOptions::default()).await;
    for i in 0..3 {
        testing::publish(&queue, &topic, Message::new(i.to_string())).await;
    }
    let delayed = testing::receive(&mut *consumer, "a message to delay").await;
    delayed
        .nack(Some(Duration::from_secs(60)))
        .await
        .expect("nack with a delay");

    let client = async_nats::connect(url()).await.expect("a NATS connection");
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream
        .get_stream("deployd-conformance")
        .await
        .expect("the suite's stream");
    let filtered_on = |subject: String| {
        let stream = stream.clone();
        async move {
            let mut names = Vec::new();
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.expect("listing consumers");
                if info.config.filter_subject == subject {
                    names.push(info.name);
                }
            }
            names
        }
    };
    let subject = format!("deployd-conformance.{topic}");
    assert_eq!(
        filtered_on(subject.clone()).await.len(),
        2,
        "both groups exist before"
    );

    testing::delete_topic(&queue, &topic).await;
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = filtered_on(subject.clone()).await;
    assert!(
        left.is_empty(),
        "consumers left on the removed topic: {left:?}"
    );
    assert!(
        stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .is_err(),
        "a message of the removed topic is left in the stream"
    );
    assert_eq!(
        filtered_on(format!("deployd-conformance.{neighbour}"))
            .await
            .len(),
        1,
        "the consumer of `{neighbour}` must stay"
    );
}
