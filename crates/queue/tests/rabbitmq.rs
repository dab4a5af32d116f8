//! The conformance suite against a real RabbitMQ broker.
//!
//! The suite runs against `DEPLOYD_TEST_RABBITMQ_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) and fails, never skips, when the broker is missing;
//! `cargo xtask e2e` starts RabbitMQ when it is not running.
//!
//! RabbitMQ runs as a system service that takes many seconds to restart, so the fault cases do
//! not restart it: they reach it through a [`TcpProxy`] whose stop cuts every connection and
//! refuses new ones, which is what a client sees of a broker going down; its start is the
//! broker coming back (with its queues, which a real durable broker keeps too).

use std::time::Duration;

use deployd_queue::Bounds;
use deployd_queue::rabbitmq::{RabbitMqOptions, RabbitMqQueue};
use deployd_queue::testing::{self, TcpProxy};

fn url() -> String {
    std::env::var("DEPLOYD_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The suite's groups are used once: RabbitMQ deletes their queues after a while.
fn options(url: String) -> RabbitMqOptions {
    let mut options = RabbitMqOptions::new(url);
    options.group_expiry = Some(Duration::from_secs(600));
    options
}

async fn connect(options: RabbitMqOptions) -> RabbitMqQueue {
    match RabbitMqQueue::connect(options).await {
        Ok(queue) => queue,
        Err(err) => panic!(
            "cannot reach RabbitMQ (set DEPLOYD_TEST_RABBITMQ_URL, or run `cargo xtask e2e`, \
             which starts it): {err}"
        ),
    }
}

deployd_queue::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    queue = connect(options(url())).await
);

const BOUND: Duration = Duration::from_secs(2);

/// The URL split around its `host:port`.
fn split_url(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
        None => (String::new(), authority),
    };
    (
        format!("{scheme}://{userinfo}"),
        host_port.to_owned(),
        path.to_owned(),
    )
}

/// llama_deploy's default URL ends with a lone `/`: the default vhost `/`, as its client
/// (aio-pika) reads it, not the empty vhost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_slash_is_the_default_vhost() {
    let (head, host_port, _) = split_url(&url());
    for path in ["/", ""] {
        let queue = connect(options(format!("{head}{host_port}{path}"))).await;
        let prefix = testing::unique_prefix("default_vhost");
        testing::round_trip(&queue, &prefix).await;
    }
}

async fn proxied() -> (TcpProxy, RabbitMqQueue) {
    let (head, host_port, path) = split_url(&url());
    let proxy = TcpProxy::in_front_of(&host_port).await;
    let options = options(format!("{head}127.0.0.1:{}{path}", proxy.port()))
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
