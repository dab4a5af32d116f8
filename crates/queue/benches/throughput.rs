//! Throughput of the queue backends: publish + receive + ack of 1 KiB messages.
//!
//! `cargo bench -p deployd-queue --bench throughput [--features redis,rabbitmq,nats,sqs,kafka]`
//! (`cargo xtask bench` starts the brokers and passes every feature).
//!
//! The in-memory backend must move at least 1,000,000 messages per second (publish premade
//! messages, then receive and ack them all, on one thread). For every broker built in, the adapter and
//! the broker's own client do the same work, measured in the same run: one publisher keeping
//! [`IN_FLIGHT`] confirmed publishes in flight, one consumer receiving one message at a time and
//! acking it. The adapter must keep at least [`MIN_RATIO`] of the raw client's rate. Each side
//! is measured [`ROUNDS`] times, alternating, and its best round counts. The brokers are read
//! from the `DEPLOYD_TEST_*` variables (see `xtask/src/brokers.rs`); `DEPLOYD_BENCH_ONLY`
//! (`kafka,redis`, or `memory`...) measures only the backends it lists. Exits non-zero on a
//! miss.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deployd_queue::memory::MemoryQueue;
use deployd_queue::{Message, MessageQueue, SubscribeOptions};

/// Publishes kept in flight by the publisher.
const IN_FLIGHT: usize = 32;
/// The adapter's least share of the raw client's rate.
const MIN_RATIO: f64 = 0.8;
/// The in-memory backend's least rate.
const MEMORY_MIN_RATE: f64 = 1_000_000.0;
/// Measurements of each side.
const ROUNDS: usize = 3;

fn payload() -> Bytes {
    Bytes::from(vec![b'x'; 1024])
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Messages per second of moving `count` messages in `elapsed`.
fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

struct Verdicts {
    misses: Vec<String>,
}

impl Verdicts {
    fn compare(&mut self, backend: &str, count: usize, adapter: f64, raw: f64) {
        let ratio = adapter / raw;
        let verdict = if ratio >= MIN_RATIO { "ok" } else { "MISS" };
        println!(
            "{backend:<10} {count:>7} msgs  adapter {adapter:>10.0} msg/s  raw client {raw:>10.0} \
             msg/s  ratio {:>5.1}%  {verdict} (>= {:.0}%)",
            ratio * 100.0,
            MIN_RATIO * 100.0
        );
        if verdict == "MISS" {
            self.misses.push(format!(
                "{backend}: the adapter keeps {:.1}% of the raw client's rate",
                ratio * 100.0
            ));
        }
    }
}

/// The adapter's rate through `queue`.
async fn adapter_rate(queue: Arc<dyn MessageQueue>, count: usize) -> f64 {
    let topic = format!("bench.{}", uuid::Uuid::new_v4().simple());
    let mut consumer = queue
        .subscribe(&topic, "bench", SubscribeOptions::default())
        .await
        .expect("subscribing");
    let start = Instant::now();
    let consuming = tokio::spawn(async move {
        for _ in 0..count {
            let delivery = consumer.next().await.expect("receiving");
            delivery.ack().await.expect("acking");
        }
    });
    let payload = payload();
    let messages: Vec<Message> = (0..count).map(|_| Message::new(payload.clone())).collect();
    deployd_queue::testing::publish_concurrently(&*queue, &topic, messages, IN_FLIGHT).await;
    consuming.await.expect("the consumer");
    rate(count, start.elapsed())
}

/// Runs `adapter` and `raw` [`ROUNDS`] times each, alternating; returns the best of each.
async fn best_of<A, R, FA, FR>(mut adapter: A, mut raw: R) -> (f64, f64)
where
    A: FnMut() -> FA,
    R: FnMut() -> FR,
    FA: std::future::Future<Output = f64>,
    FR: std::future::Future<Output = f64>,
{
    let (mut best_adapter, mut best_raw) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        best_raw = best_raw.max(raw().await);
        best_adapter = best_adapter.max(adapter().await);
    }
    (best_adapter, best_raw)
}

fn memory(verdicts: &mut Verdicts) {
    const COUNT: usize = 1_000_000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let best = runtime.block_on(async {
        let mut best = 0f64;
        for _ in 0..3 {
            let queue = MemoryQueue::new();
            let mut consumer = queue
                .subscribe("bench.memory", "bench", SubscribeOptions::default())
                .await
                .expect("subscribing");
            let payload = payload();
            let messages: Vec<Message> =
                (0..COUNT).map(|_| Message::new(payload.clone())).collect();
            let start = Instant::now();
            for message in messages {
                queue
                    .publish("bench.memory", message)
                    .await
                    .expect("publishing");
            }
            for _ in 0..COUNT {
                consumer
                    .next()
                    .await
                    .expect("receiving")
                    .ack()
                    .await
                    .expect("acking");
            }
            best = best.max(rate(COUNT, start.elapsed()));
        }
        best
    });
    let verdict = if best >= MEMORY_MIN_RATE {
        "ok"
    } else {
        "MISS"
    };
    println!(
        "{:<10} {COUNT:>7} msgs  adapter {best:>10.0} msg/s  {verdict} (>= {MEMORY_MIN_RATE:.0} msg/s)",
        "memory"
    );
    if verdict == "MISS" {
        verdicts
            .misses
            .push(format!("memory: {best:.0} messages per second"));
    }
}

#[cfg(feature = "redis")]
mod redis_bench {
    use super::*;
    use deployd_queue::redis::{RedisOptions, RedisQueue};
    use redis::streams::StreamReadReply;

    pub(super) async fn run(verdicts: &mut Verdicts) {
        const COUNT: usize = 10_000;
        let url = env("DEPLOYD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0");
        let queue: Arc<dyn MessageQueue> = Arc::new(
            RedisQueue::connect(RedisOptions::new(&url))
                .await
                .expect("connecting to redis"),
        );
        let client = redis::Client::open(url.as_str()).expect("a redis url");
        let (adapter, raw) = best_of(
            || adapter_rate(Arc::clone(&queue), COUNT),
            || raw(&client, COUNT),
        )
        .await;
        verdicts.compare("redis", COUNT, adapter, raw);
    }

    /// `XADD`, then `XREADGROUP ... COUNT 1 BLOCK` and `XACK` one at a time.
    async fn raw(client: &redis::Client, count: usize) -> f64 {
        let key = format!("bench-raw:{}", uuid::Uuid::new_v4().simple());
        let mut publisher = client
            .get_multiplexed_async_connection()
            .await
            .expect("connecting");
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("bench")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut publisher)
            .await
            .expect("XGROUP CREATE");
        let mut reader = client
            .get_multiplexed_async_connection()
            .await
            .expect("connecting");
        let start = Instant::now();
        let consumer_key = key.clone();
        let consuming = tokio::spawn(async move {
            let mut done = 0;
            while done < count {
                let reply: StreamReadReply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("bench")
                    .arg("c")
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&consumer_key)
                    .arg(">")
                    .query_async(&mut reader)
                    .await
                    .expect("XREADGROUP");
                for stream in reply.keys {
                    for entry in stream.ids {
                        let _: i64 = redis::cmd("XACK")
                            .arg(&consumer_key)
                            .arg("bench")
                            .arg(&entry.id)
                            .query_async(&mut reader)
                            .await
                            .expect("XACK");
                        done += 1;
                    }
                }
            }
        });
        let payload = payload();
        let mut sent = 0;
        while sent < count {
            let batch = IN_FLIGHT.min(count - sent);
            let mut pending = Vec::with_capacity(batch);
            for _ in 0..batch {
                let mut connection = publisher.clone();
                let key = key.clone();
                let payload = payload.clone();
                let id = uuid::Uuid::now_v7().to_string();
                pending.push(async move {
                    let _: String = redis::cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("id")
                        .arg(id)
                        .arg("attempt")
                        .arg(1)
                        .arg("payload")
                        .arg(payload.as_ref())
                        .query_async(&mut connection)
                        .await
                        .expect("XADD");
                });
            }
            futures_join_all(pending).await;
            sent += batch;
        }
        consuming.await.expect("the consumer");
        rate(count, start.elapsed())
    }
}

/// Awaits every future of `futures` concurrently.
#[allow(dead_code)]
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq_bench {
    use super::*;
    use deployd_queue::rabbitmq::{RabbitMqOptions, RabbitMqQueue};
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

    pub(super) async fn run(verdicts: &mut Verdicts) {
        const COUNT: usize = 10_000;
        let url = env(
            "DEPLOYD_TEST_RABBITMQ_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        );
        let queue: Arc<dyn MessageQueue> = Arc::new(
            RabbitMqQueue::connect(RabbitMqOptions::new(&url))
                .await
                .expect("connecting to rabbitmq"),
        );
        let (adapter, raw) = best_of(
            || adapter_rate(Arc::clone(&queue), COUNT),
            || raw(&url, COUNT),
        )
        .await;
        verdicts.compare("rabbitmq", COUNT, adapter, raw);
    }

    /// The same topology (fanout exchange, durable queue), persistent messages with publisher
    /// confirms, a consumer with a prefetch of 2 acking each message.
    async fn raw(url: &str, count: usize) -> f64 {
        let name = format!("bench-raw.{}", uuid::Uuid::new_v4().simple());
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connecting");
        let publisher = connection.create_channel().await.expect("a channel");
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        publisher
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("an exchange");
        let consumer = connection.create_channel().await.expect("a channel");
        consumer
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a queue");
        consumer
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("a binding");
        consumer
            .basic_qos(2, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut stream = consumer
            .basic_consume(
                name.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consuming");
        let start = Instant::now();
        let consuming = tokio::spawn(async move {
            for _ in 0..count {
                let delivery = stream
                    .next()
                    .await
                    .expect("a delivery")
                    .expect("a delivery");
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("acking");
            }
        });
        let payload = payload();
        let mut sent = 0;
        while sent < count {
            let batch = IN_FLIGHT.min(count - sent);
            let mut pending = Vec::with_capacity(batch);
            for _ in 0..batch {
                let publisher = publisher.clone();
                let name = name.clone();
                let payload = payload.clone();
                pending.push(async move {
                    let properties = BasicProperties::default()
                        .with_message_id(uuid::Uuid::now_v7().to_string().into())
                        .with_delivery_mode(2);
                    publisher
                        .basic_publish(
                            name.as_str().into(),
                            "".into(),
                            BasicPublishOptions::default(),
                            &payload,
                            properties,
                        )
                        .await
                        .expect("publishing")
                        .await
                        .expect("a confirm");
                });
            }
            futures_join_all(pending).await;
            sent += batch;
        }
        consuming.await.expect("the consumer");
        let elapsed = start.elapsed();
        let _ = consumer
            .queue_delete(name.as_str().into(), Default::default())
            .await;
        let _ = publisher
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
        rate(count, elapsed)
    }
}

#[cfg(feature = "nats")]
mod nats_bench {
    use super::*;
    use async_nats::jetstream::{self, consumer::pull, stream};
    use deployd_queue::nats::{NatsOptions, NatsQueue};
    use futures::StreamExt;

    pub(super) async fn run(verdicts: &mut Verdicts) {
        const COUNT: usize = 10_000;
        let url = env("DEPLOYD_TEST_NATS_URL", "nats://127.0.0.1:4222");
        // A stream of its own, as the raw client gets: a stream's cost grows with its groups.
        let stream = format!("bench{}", uuid::Uuid::new_v4().simple());
        let mut options = NatsOptions::new(&url);
        options.stream_prefix = stream.clone();
        let queue: Arc<dyn MessageQueue> = Arc::new(
            NatsQueue::connect(options)
                .await
                .expect("connecting to nats"),
        );
        let client = async_nats::connect(url.as_str()).await.expect("connecting");
        let (adapter, raw) = best_of(
            || adapter_rate(Arc::clone(&queue), COUNT),
            || raw(&client, COUNT),
        )
        .await;
        let _ = jetstream::new(client.clone()).delete_stream(&stream).await;
        verdicts.compare("nats", COUNT, adapter, raw);
    }

    /// A stream with interest retention, publishes waiting for the stream's ack, a durable pull
    /// consumer fetching one message at a time and acking it.
    async fn raw(client: &async_nats::Client, count: usize) -> f64 {
        let name = format!("benchraw{}", uuid::Uuid::new_v4().simple());
        let jetstream = jetstream::new(client.clone());
        let stream = jetstream
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{name}.>")],
                retention: stream::RetentionPolicy::Interest,
                ..Default::default()
            })
            .await
            .expect("a stream");
        let consumer = stream
            .get_or_create_consumer(
                "bench",
                pull::Config {
                    durable_name: Some("bench".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .expect("a consumer");
        let subject = format!("{name}.tasks");
        let start = Instant::now();
        let consuming = tokio::spawn(async move {
            let mut done = 0;
            while done < count {
                let mut batch = consumer
                    .fetch()
                    .max_messages(1)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .expect("pulling");
                while let Some(message) = batch.next().await {
                    message.expect("a message").ack().await.expect("acking");
                    done += 1;
                }
            }
        });
        let payload = payload();
        let mut sent = 0;
        while sent < count {
            let batch = IN_FLIGHT.min(count - sent);
            let mut pending = Vec::with_capacity(batch);
            for _ in 0..batch {
                let jetstream = jetstream.clone();
                let subject = subject.clone();
                let payload = payload.clone();
                pending.push(async move {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
                    jetstream
                        .publish_with_headers(subject, headers, payload)
                        .await
                        .expect("publishing")
                        .await
                        .expect("a publish ack");
                });
            }
            futures_join_all(pending).await;
            sent += batch;
        }
        consuming.await.expect("the consumer");
        let _ = jetstream.delete_stream(&name).await;
        rate(count, start.elapsed())
    }
}

#[cfg(feature = "sqs")]
mod sqs_bench {
    use super::*;
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_sqs::primitives::Blob;
    use aws_sdk_sqs::types::MessageAttributeValue;
    use deployd_queue::sqs::{SqsOptions, SqsQueue};

    pub(super) async fn run(verdicts: &mut Verdicts) {
        // moto answers a few hundred requests per second.
        const COUNT: usize = 300;
        let endpoint = env("DEPLOYD_TEST_SQS_ENDPOINT", "http://127.0.0.1:5000");
        let key = env("AWS_ACCESS_KEY_ID", "test");
        let secret = env("AWS_SECRET_ACCESS_KEY", "test");
        let queue: Arc<dyn MessageQueue> = Arc::new(
            SqsQueue::connect(
                SqsOptions::new("us-east-1")
                    .endpoint(&endpoint)
                    .credentials(&key, &secret),
            )
            .await
            .expect("connecting to sqs"),
        );
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(Credentials::new(key, secret, None, None, "bench"))
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        let client = aws_sdk_sqs::Client::from_conf(config);
        let (adapter, raw) = best_of(
            || adapter_rate(Arc::clone(&queue), COUNT),
            || raw(&client, COUNT),
        )
        .await;
        verdicts.compare("sqs", COUNT, adapter, raw);
    }

    /// `SendMessage` with the payload as a binary attribute, `ReceiveMessage` of one message
    /// with long polling, `DeleteMessage`.
    async fn raw(client: &aws_sdk_sqs::Client, count: usize) -> f64 {
        let name = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
        let url = client
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .expect("a queue")
            .queue_url
            .expect("a queue url");
        let start = Instant::now();
        let consuming = {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while done < count {
                    let received = client
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(1)
                        .wait_time_seconds(1)
                        .message_attribute_names("All")
                        .send()
                        .await
                        .expect("receiving");
                    for message in received.messages() {
                        client
                            .delete_message()
                            .queue_url(&url)
                            .receipt_handle(message.receipt_handle().unwrap_or_default())
                            .send()
                            .await
                            .expect("deleting");
                        done += 1;
                    }
                }
            })
        };
        let payload = payload();
        let mut sent = 0;
        while sent < count {
            let batch = IN_FLIGHT.min(count - sent);
            let mut pending = Vec::with_capacity(batch);
            for _ in 0..batch {
                let client = client.clone();
                let url = url.clone();
                let payload = payload.clone();
                pending.push(async move {
                    client
                        .send_message()
                        .queue_url(&url)
                        .message_body("bench")
                        .message_attributes(
                            "payload",
                            MessageAttributeValue::builder()
                                .data_type("Binary")
                                .binary_value(Blob::new(payload.to_vec()))
                                .build()
                                .expect("an attribute"),
                        )
                        .send()
                        .await
                        .expect("sending");
                });
            }
            futures_join_all(pending).await;
            sent += batch;
        }
        consuming.await.expect("the consumer");
        let _ = client.delete_queue().queue_url(&url).send().await;
        rate(count, start.elapsed())
    }
}

#[cfg(feature = "kafka")]
mod kafka_bench {
    use super::*;
    use deployd_queue::kafka::{KafkaOptions, KafkaQueue};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Message as _, Offset, TopicPartitionList};

    pub(super) async fn run(verdicts: &mut Verdicts) {
        const COUNT: usize = 10_000;
        let brokers = env("DEPLOYD_TEST_KAFKA_BROKERS", "127.0.0.1:9092");
        let queue: Arc<dyn MessageQueue> = Arc::new(
            KafkaQueue::connect(KafkaOptions::new(&brokers))
                .await
                .expect("connecting to kafka"),
        );
        let (adapter, raw) = best_of(
            || adapter_rate(Arc::clone(&queue), COUNT),
            || raw(&brokers, COUNT),
        )
        .await;
        verdicts.compare("kafka", COUNT, adapter, raw);
    }

    /// The adapter's work with rdkafka alone: a one-partition topic, a producer with
    /// `acks=all` and the same linger, the id and attempt as record headers; a group member
    /// receiving one record at a time, storing its offset for librdkafka's auto-commit.
    async fn raw(brokers: &str, count: usize) -> f64 {
        let topic = format!("bench-raw.{}", uuid::Uuid::new_v4().simple());
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("an admin client");
        admin
            .create_topics(
                [&NewTopic::new(&topic, 1, TopicReplication::Fixed(-1))],
                &AdminOptions::new(),
            )
            .await
            .expect("creating the topic");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("linger.ms", "2")
            .create()
            .expect("a producer");
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{topic}.bench"))
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "500")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("a consumer");
        consumer.subscribe(&[&topic]).expect("subscribing");
        let start = Instant::now();
        let consuming = tokio::spawn(async move {
            for _ in 0..count {
                let record = consumer.recv().await.expect("receiving");
                let mut offsets = TopicPartitionList::new();
                offsets
                    .add_partition_offset(
                        record.topic(),
                        record.partition(),
                        Offset::Offset(record.offset() + 1),
                    )
                    .expect("an offset");
                consumer
                    .store_offsets(&offsets)
                    .expect("storing the offset");
            }
        });
        let payload = payload();
        let mut sent = 0;
        while sent < count {
            let batch = IN_FLIGHT.min(count - sent);
            let mut pending = Vec::with_capacity(batch);
            for _ in 0..batch {
                let producer = &producer;
                let topic = &topic;
                let payload = &payload;
                let id = uuid::Uuid::now_v7().to_string();
                pending.push(async move {
                    let headers = OwnedHeaders::new()
                        .insert(Header {
                            key: "deployd-id",
                            value: Some(id.as_str()),
                        })
                        .insert(Header {
                            key: "deployd-attempt",
                            value: Some("1"),
                        });
                    let record = FutureRecord::<(), [u8]>::to(topic)
                        .payload(&payload[..])
                        .headers(headers);
                    producer
                        .send(record, Duration::from_secs(10))
                        .await
                        .expect("sending");
                });
            }
            futures_join_all(pending).await;
            sent += batch;
        }
        consuming.await.expect("the consumer");
        rate(count, start.elapsed())
    }
}

/// Whether `backend` is measured: all unless `DEPLOYD_BENCH_ONLY` lists some (`kafka,redis`).
fn selected(backend: &str) -> bool {
    std::env::var("DEPLOYD_BENCH_ONLY")
        .map(|only| only.split(',').any(|b| b.trim() == backend))
        .unwrap_or(true)
}

fn main() -> ExitCode {
    let mut verdicts = Verdicts { misses: Vec::new() };
    if selected("memory") {
        memory(&mut verdicts);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        #[cfg(feature = "redis")]
        if selected("redis") {
            redis_bench::run(&mut verdicts).await;
        }
        #[cfg(feature = "rabbitmq")]
        if selected("rabbitmq") {
            rabbitmq_bench::run(&mut verdicts).await;
        }
        #[cfg(feature = "nats")]
        if selected("nats") {
            nats_bench::run(&mut verdicts).await;
        }
        #[cfg(feature = "sqs")]
        if selected("sqs") {
            sqs_bench::run(&mut verdicts).await;
        }
        #[cfg(feature = "kafka")]
        if selected("kafka") {
            kafka_bench::run(&mut verdicts).await;
        }
        let _ = &mut verdicts;
    });
    if verdicts.misses.is_empty() {
        ExitCode::SUCCESS
    } else {
        for miss in &verdicts.misses {
            eprintln!("throughput: MISS: {miss}");
        }
        ExitCode::FAILURE
    }
}
