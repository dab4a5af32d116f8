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

/// Whether `declare` on a fresh channel of `connection` succeeds; a passive declare of what
/// does not exist fails (and closes its channel).
async fn exists<F, Fut>(connection: &lapin::Connection, declare: F) -> bool
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<()>>,
{
    let channel = connection.create_channel().await.expect("a channel");
    declare(channel).await.is_ok()
}

/// A removed topic's exchange, group queues (those of another process too, found through the
/// topic's records) and delay queues are gone from the broker, as passive declares show;
/// another topic keeps its exchange and queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_leaves_no_exchange_and_no_queue() {
    use deployd_queue::{Message, SubscribeOptions};
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let queue = connect(options(url())).await;
    let other_process = connect(options(url())).await;
    let prefix = testing::unique_prefix("delete_exchange");
    let topic = format!("{prefix}.tasks");
    let neighbour = format!("{prefix}.tasks2");
    // A group of another process, with a message in its delay queue.
    let mut remote = testing::subscribe(
        &other_process,
        &topic,
        "remote",
        SubscribeOptions::default(),
    )
    .await;
    let mut consumer =
        testing::subscribe(&queue, &topic, "workers", SubscribeOptions::default()).await;
    let _neighbour =
        testing::subscribe(&queue, &neighbour, "workers", SubscribeOptions::default()).await;
    testing::publish(&queue, &topic, Message::new("removed with its topic")).await;
    let delayed = testing::receive(&mut *remote, "a message to delay").await;
    delayed
        .nack(Some(Duration::from_secs(60)))
        .await
        .expect("nack with a delay");
    let held = testing::receive(&mut *consumer, "a message to hold").await;

    let connection = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("a connection to RabbitMQ");
    let exchange_exists = |name: String| {
        exists(&connection, |channel| async move {
            let options = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            channel
                .exchange_declare(
                    name.as_str().into(),
                    lapin::ExchangeKind::Fanout,
                    options,
                    FieldTable::default(),
                )
                .await
        })
    };
    let queue_exists = |name: String| {
        exists(&connection, |channel| async move {
            let options = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(name.as_str().into(), options, FieldTable::default())
                .await
                .map(|_| ())
        })
    };
    let exchange = format!("deployd.{topic}");
    let queues = [
        format!("{exchange}.workers"),
        format!("{exchange}.remote"),
        format!("{exchange}.remote.delay.60000"),
    ];
    assert!(
        exchange_exists(exchange.clone()).await,
        "the exchange exists before"
    );
    for name in &queues {
        assert!(
            queue_exists(name.clone()).await,
            "queue `{name}` exists before"
        );
    }

    // A member of another process that is still running would declare its queue again when
    // the broker cancels it: that process is done with the topic.
    drop(remote);
    testing::delete_topic(&queue, &topic).await;
    drop(held);
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !exchange_exists(exchange.clone()).await,
        "the exchange of the removed topic is left"
    );
    for name in &queues {
        assert!(
            !queue_exists(name.clone()).await,
            "queue `{name}` of the removed topic is left"
        );
    }
    for suffix in [":groups", ":delays"] {
        assert!(
            !queue_exists(format!("{exchange}{suffix}")).await,
            "the records `{suffix}` of the removed topic are left"
        );
    }
    let neighbour_exchange = format!("deployd.{neighbour}");
    assert!(exchange_exists(neighbour_exchange.clone()).await);
    assert!(queue_exists(format!("{neighbour_exchange}.workers")).await);
}
