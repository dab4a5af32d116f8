//! The conformance suite against SQS: `moto_server` (from PyPI's `moto[server]`) or AWS.
//!
//! The suite runs against `DEPLOYD_TEST_SQS_ENDPOINT` (default `http://127.0.0.1:5000`) in
//! `DEPLOYD_TEST_SQS_REGION` (default `us-east-1`), with the credentials of
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or, without them, moto's dummy `test`/`test`.
//! It fails, never skips, when the endpoint does not answer; `cargo xtask e2e` starts moto.
//!
//! moto keeps its queues in memory, so restarting it is a loss of every queue rather than an
//! outage: the fault cases reach it through a [`TcpProxy`] whose stop cuts every connection and
//! refuses new ones, and whose start brings the endpoint back with its queues.

use std::time::Duration;

use deployd_queue::Bounds;
use deployd_queue::sqs::{SqsOptions, SqsQueue};
use deployd_queue::testing::{self, TcpProxy};

fn endpoint() -> String {
    std::env::var("DEPLOYD_TEST_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

fn options(endpoint: String) -> SqsOptions {
    let region = std::env::var("DEPLOYD_TEST_SQS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let mut options = SqsOptions::new(region).endpoint(endpoint);
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        options = options.credentials("test", "test");
    }
    options
}

async fn connect(options: SqsOptions) -> SqsQueue {
    let endpoint = options.endpoint.clone().unwrap_or_default();
    match SqsQueue::connect(options).await {
        Ok(queue) => queue,
        Err(err) => panic!(
            "cannot reach SQS at {endpoint} (set DEPLOYD_TEST_SQS_ENDPOINT, or run `cargo xtask \
             e2e`, which starts moto_server): {err}"
        ),
    }
}

// moto answers about 20 receive-and-delete round trips per second to the SDK's own client
// (measured by `benches/throughput.rs`), fewer with four members polling at once: 100,000
// messages would take hours, so the many-messages case moves 500 here.
// `DEPLOYD_TEST_SQS_MANY_MESSAGES` overrides it: set 100000 against AWS.
deployd_queue::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    queue = connect(options(endpoint())).await,
    many_messages = many_messages()
);

/// `DEPLOYD_TEST_SQS_MANY_MESSAGES`, or 500.
fn many_messages() -> usize {
    std::env::var("DEPLOYD_TEST_SQS_MANY_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500)
}

const BOUND: Duration = Duration::from_secs(2);

async fn proxied() -> (TcpProxy, SqsQueue) {
    let endpoint = endpoint();
    let authority = endpoint
        .strip_prefix("http://")
        .expect("the fault cases need a plain-HTTP endpoint such as moto's")
        .trim_end_matches('/');
    let proxy = TcpProxy::in_front_of(authority).await;
    let options = options(format!("http://127.0.0.1:{}", proxy.port()))
        .bounds(Bounds::default().publish_timeout(BOUND));
    let queue = connect(options).await;
    (proxy, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_down_fails_within_bound() {
    let (proxy, queue) = proxied().await;
    let prefix = testing::unique_prefix("down");
    testing::publish_while_down_fails_within_bound(&queue, &proxy, BOUND, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_restart() {
    let (proxy, queue) = proxied().await;
    let prefix = testing::unique_prefix("restart");
    testing::reconnects_after_restart(&queue, &proxy, true, &prefix).await;
}

/// A removed topic leaves no queue with its name prefix, whichever process created them;
/// another topic keeps its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_leaves_no_queue() {
    use deployd_queue::{Message, SubscribeOptions};

    let queue = connect(options(endpoint())).await;
    let other_process = connect(options(endpoint())).await;
    let prefix = testing::unique_prefix("delete_queues");
    let topic = format!("{prefix}.tasks");
    let neighbour = format!("{prefix}.tasks2");
    let mut consumer =
        testing::subscribe(&queue, &topic, "workers", SubscribeOptions::default()).await;
    let _other =
        testing::subscribe(&other_process, &topic, "audit", SubscribeOptions::default()).await;
    let _neighbour =
        testing::subscribe(&queue, &neighbour, "workers", SubscribeOptions::default()).await;
    testing::publish(&queue, &topic, Message::new("removed with its topic")).await;
    let held = testing::receive(&mut *consumer, "a message to hold").await;

    let options = options(endpoint());
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new(options.region.clone()))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            options
                .access_key_id
                .clone()
                .unwrap_or_else(|| std::env::var("AWS_ACCESS_KEY_ID").expect("SQS credentials")),
            options.secret_access_key.clone().unwrap_or_else(|| {
                std::env::var("AWS_SECRET_ACCESS_KEY").expect("SQS credentials")
            }),
            None,
            None,
            "test",
        ))
        .endpoint_url(endpoint())
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    let sqs = aws_sdk_sqs::Client::from_conf(config);
    // A topic's queues are named `deployd-{hash of the topic}-...`, the hash being FNV-1a.
    let listed = |topic: &str| {
        let hash = topic.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let prefix = format!("deployd-{hash:016x}-");
        let sqs = sqs.clone();
        async move {
            sqs.list_queues()
                .queue_name_prefix(prefix)
                .max_results(1000)
                .send()
                .await
                .expect("ListQueues")
                .queue_urls()
                .to_vec()
        }
    };
    assert_eq!(listed(&topic).await.len(), 2, "both groups exist before");

    testing::delete_topic(&queue, &topic).await;
    drop(held);
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = listed(&topic).await;
    assert!(
        left.is_empty(),
        "queues left by the removed topic: {left:?}"
    );
    assert_eq!(
        listed(&neighbour).await.len(),
        1,
        "the queue of `{neighbour}` must stay"
    );
}
