//! The Kafka backend (feature `kafka`), through `rdkafka` with a bundled librdkafka.
//!
//! Layout, for topic `t`, group `g` and prefix `p` ([`KafkaOptions::topic_prefix`]):
//! - topic `t` is the Kafka topic `p.t`, created on first use with
//!   [`KafkaOptions::partitions`] partitions (1 by default);
//! - group `g` on it is the Kafka consumer group `p.t.g`. When a group is first joined, its
//!   committed offsets are set to the partitions' ends unless it has some already, so that it
//!   starts with the messages published after its creation (and a restarted process resumes
//!   where the group left off).
//!
//! Kafka has no per-message ack: a group only commits one offset per partition. So each
//! process runs **one Kafka group member per group** (one `rdkafka` consumer, joined with
//! `subscribe`), and every [`Consumer`] of that group in the process is a local member of it:
//! the local members take the messages that Kafka member receives from one shared in-process
//! queue (competing consumers), and the backend keeps track of what each of them holds:
//! - per partition, the offsets received and not yet acked; the group's offset is stored (and
//!   committed by librdkafka's auto-commit every [`COMMIT_INTERVAL`]) as the lowest offset
//!   still in flight, or just past the last message received when nothing is. A message is
//!   therefore never committed before its ack, and what a crashed process held (or had
//!   received but not handed out) is received again by the member that takes the partition
//!   over, after Kafka's session timeout.
//! - a nack, an abandoned delivery, a passed ack deadline (a client timer per delivery) and a
//!   dropped [`Consumer`] hand the message to the local members again, with `attempt + 1`,
//!   keeping its offset in flight; a delayed nack waits in a timer first. A late ack or nack of
//!   a delivery whose deadline passed is ignored.
//!
//! Several processes in one group share the topic's partitions through Kafka's group
//! protocol, so a topic is read by at most as many processes as it has partitions. A message
//! redelivered by Kafka after a crash (rather than by the process that held it) carries the
//! attempt number it was published with, since Kafka stores no per-message state. A message
//! nacked again and again, or held for long, holds back its partition's committed offset:
//! after a crash, the messages behind it are delivered again too (at-least-once).
//!
//! `publish` waits for the broker's acknowledgement from all in-sync replicas (`acks=all`);
//! librdkafka retries on a lost connection and the publish fails with
//! [`Error::Unavailable`] after [`Bounds::publish_timeout`](crate::Bounds::publish_timeout)
//! (librdkafka's `message.timeout.ms`). librdkafka reconnects by itself, in the background,
//! with its exponential backoff set from the [`Bounds`](crate::Bounds) reconnect delays (the
//! longest capped at a quarter of the publish timeout, so that a publish made just after the
//! broker came back gets through); creating topics and setting a new group's start are
//! retried with `backon` within the publish timeout.
//!
//! A process's group member receives nothing until Kafka assigned it partitions: tansu
//! completes a join after half of [`KafkaOptions::session_timeout`] (3 s by default), Kafka
//! after its `group.initial.rebalance.delay.ms` for a new group. `subscribe` returns before
//! that; what is published meanwhile waits in the topic and is received once the join is done.
//!
//! Message ids, attempt numbers and headers travel as Kafka record headers (`deployd-id`,
//! `deployd-attempt`, `header:{name}`); a record published by another client gets the id
//! `{partition}@{offset}` and attempt 1. Payloads up to [`MAX_MESSAGE_BYTES`] are accepted;
//! the topics are created with that `max.message.bytes`.
//!
//! [`MessageQueue::delete_topic`] first stops this process's group members of the topic (their
//! local members end with [`Error::Closed`], and what they hold settles as nothing), then
//! deletes the Kafka topic `p.t` with the admin client, then the Kafka consumer groups `p.t.*`:
//! those this process joined, and those the broker lists (`ListGroups`) under that prefix,
//! except a group whose name could belong to another existing topic (`p.t.x.g` while topic
//! `p.t.x` exists). Kafka refuses to delete a group that still has members: the members of
//! this process leave at once (the deletion waits for them within the publish timeout), a
//! group with members in other processes is left (with a warning) for Kafka to drop once it
//! is empty and its offsets expire. Those members see no more messages of the deleted topic.
//! This process's members are closed, not only unsubscribed, before the topic goes: against
//! tansu 0.6, a librdkafka consumer that still knew the deleted topic crashed the process
//! (tansu answered its metadata request with a topic without a name).
//!
//! Order: Kafka keeps publish order per partition. With one partition (the default) a single
//! member receives a topic's messages in publish order; redeliveries go first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use crate::config::KafkaOptions;
use crate::deadline::{Deadlines, Settlement, Settles};
use crate::redact::{Secrets, redact_url};
use crate::retry;
use crate::{Acker, Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

const ID_HEADER: &str = "deployd-id";
const ATTEMPT_HEADER: &str = "deployd-attempt";
const USER_HEADER_PREFIX: &str = "header:";

/// The largest record the backend publishes (payload and headers).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How often librdkafka commits the offsets the backend stored.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// How many received messages wait for the local members of a group, at most.
const PREFETCH: usize = 256;

/// A [`MessageQueue`] on Kafka. See the [module docs](self).
///
/// Cloning is cheap and yields another handle on the same producer and group members.
#[derive(Clone)]
pub struct KafkaQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaQueue")
            .field("brokers", &redact_url(&self.shared.options.brokers))
            .field("topic_prefix", &self.shared.options.topic_prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: KafkaOptions,
    /// The secret settings of `options`, hidden in errors and in librdkafka's log lines.
    secrets: Arc<Secrets>,
    producer: FutureProducer<Logging>,
    /// librdkafka's default context: with deployd's `Logging` context the admin client made
    /// the broker-restart fault test hang now and then (2 runs in 7, against 0 in 10 without
    /// it). Its log lines go to the `log` crate, which deployd does not print.
    admin: AdminClient<rdkafka::client::DefaultClientContext>,
    /// The Kafka topics known to exist.
    topics: Mutex<HashSet<String>>,
    /// The group members of this process, by Kafka topic and group id.
    groups: tokio::sync::Mutex<HashMap<(String, String), Weak<Group>>>,
    /// The group ids this process joined, by Kafka topic, for `delete_topic`.
    joined: Mutex<HashMap<String, BTreeSet<String>>>,
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("kafka: {what}: {err}"))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

impl KafkaQueue {
    /// Connects to the cluster of `options.brokers`; fails with [`Error::Unavailable`] when no
    /// broker answers within the connect timeout, and with [`Error::InvalidConfig`] for
    /// unusable options (malformed bootstrap servers among them) before connecting.
    pub async fn connect(options: KafkaOptions) -> Result<Self, Error> {
        let secrets = Arc::new(Secrets::of_kafka(&options));
        Self::connect_checked(options, Arc::clone(&secrets))
            .await
            .map_err(|err| secrets.scrub_error(err))
    }

    async fn connect_checked(options: KafkaOptions, secrets: Arc<Secrets>) -> Result<Self, Error> {
        options.validate()?;
        if options.partitions < 1 {
            return Err(Error::InvalidConfig(format!(
                "kafka partitions must be at least 1, not {}",
                options.partitions
            )));
        }
        if options.topic_prefix.is_empty()
            || crate::validate_name("topic", &options.topic_prefix).is_err()
            || options.topic_prefix.len() > 40
        {
            return Err(Error::InvalidConfig(format!(
                "kafka topic prefix `{}` must be 1 to 40 letters, digits, `.`, `_` and `-`",
                options.topic_prefix
            )));
        }
        let producer: FutureProducer<Logging> = client_config(&options)
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
            .set("message.timeout.ms", millis(options.bounds.publish_timeout))
            .create_with_context(Logging::new(&secrets))
            .map_err(|err| Error::InvalidConfig(format!("kafka producer: {err}")))?;
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = client_config(&options)
            .create()
            .map_err(|err| Error::InvalidConfig(format!("kafka admin client: {err}")))?;
        let connect_timeout = options.bounds.connect_timeout;
        let probe = producer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            probe.client().fetch_metadata(None, connect_timeout)
        })
        .await
        .map_err(|err| Error::Backend(format!("kafka: the metadata probe failed: {err}")))?;
        if let Err(err) = metadata {
            return Err(unavailable(
                &format!("no broker of `{}` answered", redact_url(&options.brokers)),
                err,
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                options,
                secrets,
                producer,
                admin,
                topics: Mutex::new(HashSet::new()),
                groups: tokio::sync::Mutex::new(HashMap::new()),
                joined: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// The settings every client of `options` shares; `options.extra` last.
fn client_config(options: &KafkaOptions) -> ClientConfig {
    let bounds = &options.bounds;
    // librdkafka reconnects in the background, not when a publish asks: a longest delay of a
    // quarter of the publish timeout leaves a publish made just after the broker came back the
    // time to get through.
    let max_delay = bounds
        .reconnect_max_delay
        .min(bounds.publish_timeout / 4)
        .max(bounds.reconnect_min_delay);
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        // librdkafka's least value is one second.
        .set(
            "socket.connection.setup.timeout.ms",
            millis(bounds.connect_timeout.max(Duration::from_secs(1))),
        )
        .set("reconnect.backoff.ms", millis(bounds.reconnect_min_delay))
        .set("reconnect.backoff.max.ms", millis(max_delay))
        .set("retry.backoff.ms", millis(bounds.reconnect_min_delay))
        .set("retry.backoff.max.ms", millis(max_delay))
        .set("topic.metadata.refresh.interval.ms", "10000");
    for (key, value) in &options.extra {
        config.set(key, value);
    }
    config
}

impl Shared {
    fn kafka_topic(&self, topic: &str) -> String {
        format!("{}.{topic}", self.options.topic_prefix)
    }

    /// Creates `kafka_topic` unless it is known to exist; retried within `limit`.
    async fn ensure_topic(&self, kafka_topic: &str, limit: Duration) -> Result<(), Error> {
        if lock(&self.topics).contains(kafka_topic) {
            return Ok(());
        }
        let bounds = &self.options.bounds;
        retry::bounded(bounds, limit, "creating a kafka topic", || {
            self.create_topic(kafka_topic, limit)
        })
        .await?;
        lock(&self.topics).insert(kafka_topic.to_owned());
        Ok(())
    }

    async fn create_topic(&self, kafka_topic: &str, limit: Duration) -> Result<(), Error> {
        let max_bytes = MAX_MESSAGE_BYTES.to_string();
        let replication = match self.options.replication_factor {
            Some(factor) => TopicReplication::Fixed(factor),
            None => TopicReplication::Fixed(-1),
        };
        let new = NewTopic::new(kafka_topic, self.options.partitions, replication)
            .set("max.message.bytes", &max_bytes);
        let admin_options = AdminOptions::new().operation_timeout(Some(limit));
        let results = self
            .admin
            .create_topics([&new], &admin_options)
            .await
            .map_err(|err| unavailable("creating a topic", err))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code @ RDKafkaErrorCode::InvalidTopic))
                | Err((name, code @ RDKafkaErrorCode::InvalidConfig))
                | Err((name, code @ RDKafkaErrorCode::InvalidPartitions))
                | Err((name, code @ RDKafkaErrorCode::InvalidReplicationFactor))
                | Err((name, code @ RDKafkaErrorCode::TopicAuthorizationFailed)) => {
                    return Err(Error::Backend(format!(
                        "kafka: cannot create topic `{name}`: {code}"
                    )));
                }
                Err((name, code)) => {
                    return Err(unavailable(&format!("creating topic `{name}`"), code));
                }
            }
        }
        Ok(())
    }

    /// The group member of this process for `group_id` on `kafka_topic`, joining on first use.
    async fn group(
        self: &Arc<Self>,
        kafka_topic: &str,
        group_id: String,
    ) -> Result<Arc<Group>, Error> {
        let mut groups = self.groups.lock().await;
        groups.retain(|_, group| group.strong_count() > 0);
        let key = (kafka_topic.to_owned(), group_id);
        if let Some(group) = groups.get(&key).and_then(Weak::upgrade) {
            return Ok(group);
        }
        let group = Group::join(self, kafka_topic, &key.1).await?;
        lock(&self.joined)
            .entry(key.0.clone())
            .or_default()
            .insert(key.1.clone());
        groups.insert(key, Arc::downgrade(&group));
        Ok(group)
    }

    /// Stops this process's members of `kafka_topic`, then deletes the topic and its groups.
    async fn delete_topic(&self, kafka_topic: &str) -> Result<(), Error> {
        let limit = self.options.bounds.publish_timeout;
        let bounds = &self.options.bounds;
        let mut members = Vec::new();
        self.groups.lock().await.retain(|(topic, _), group| {
            if topic != kafka_topic {
                return true;
            }
            members.extend(group.upgrade());
            false
        });
        for group in members {
            group.close(limit).await;
        }
        lock(&self.topics).remove(kafka_topic);
        retry::bounded(bounds, limit, "deleting a kafka topic", || {
            self.delete_kafka_topic(kafka_topic, limit)
        })
        .await?;
        let joined = lock(&self.joined)
            .get(kafka_topic)
            .cloned()
            .unwrap_or_default();
        let mut group_ids = joined.clone();
        match self.list_groups(kafka_topic, limit).await {
            Ok(listed) => group_ids.extend(listed),
            Err(err) => {
                tracing::warn!(
                    topic = kafka_topic,
                    error = %err,
                    "cannot list the kafka groups; deleting those this process joined"
                );
            }
        }
        if !group_ids.is_empty() {
            retry::bounded(bounds, limit, "deleting kafka groups", || {
                self.delete_groups(&group_ids, &joined, limit)
            })
            .await?;
        }
        lock(&self.joined).remove(kafka_topic);
        Ok(())
    }

    async fn delete_kafka_topic(&self, kafka_topic: &str, limit: Duration) -> Result<(), Error> {
        let admin_options = AdminOptions::new().operation_timeout(Some(limit));
        let results = self
            .admin
            .delete_topics(&[kafka_topic], &admin_options)
            .await
            .map_err(|err| unavailable("deleting a topic", err))?;
        for result in results {
            match result {
                Ok(_)
                | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))
                | Err((_, RDKafkaErrorCode::UnknownTopic)) => {}
                Err((name, code @ RDKafkaErrorCode::TopicAuthorizationFailed))
                | Err((name, code @ RDKafkaErrorCode::TopicDeletionDisabled)) => {
                    return Err(Error::Backend(format!(
                        "kafka: cannot delete topic `{name}`: {code}"
                    )));
                }
                Err((name, code)) => {
                    return Err(unavailable(&format!("deleting topic `{name}`"), code));
                }
            }
        }
        Ok(())
    }

    /// The groups the broker lists for `kafka_topic`: named `{kafka_topic}.{group}`, and not
    /// possibly a group of another existing topic whose name starts with `{kafka_topic}.`.
    async fn list_groups(&self, kafka_topic: &str, limit: Duration) -> Result<Vec<String>, Error> {
        let producer = self.producer.clone();
        let topic = kafka_topic.to_owned();
        let listing = tokio::task::spawn_blocking(move || {
            let client = producer.client();
            let groups = client
                .fetch_group_list(None, limit)
                .map_err(|err| unavailable("listing groups", err))?;
            let metadata = client
                .fetch_metadata(None, limit)
                .map_err(|err| unavailable("listing topics", err))?;
            let topics: Vec<String> = metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .collect();
            let names: Vec<String> = groups
                .groups()
                .iter()
                .map(|g| g.name().to_owned())
                .collect();
            Ok::<_, Error>(groups_of(&topic, &names, &topics))
        });
        match tokio::time::timeout(limit + Duration::from_secs(1), listing).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => Err(Error::Backend(format!("kafka: listing groups: {err}"))),
            Err(_) => Err(Error::Unavailable(format!(
                "kafka: listing groups did not complete within {limit:?}"
            ))),
        }
    }

    /// Deletes `group_ids`. A group that still has members is waited for (as unavailable) if
    /// this process joined it (its members are leaving), else left with a warning.
    async fn delete_groups(
        &self,
        group_ids: &BTreeSet<String>,
        joined: &BTreeSet<String>,
        limit: Duration,
    ) -> Result<(), Error> {
        let names: Vec<&str> = group_ids.iter().map(String::as_str).collect();
        let admin_options = AdminOptions::new().operation_timeout(Some(limit));
        let results = self
            .admin
            .delete_groups(&names, &admin_options)
            .await
            .map_err(|err| unavailable("deleting groups", err))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((name, RDKafkaErrorCode::NonEmptyGroup)) if joined.contains(&name) => {
                    return Err(Error::Unavailable(format!(
                        "kafka: group `{name}` still has members of this process"
                    )));
                }
                Err((name, RDKafkaErrorCode::NonEmptyGroup)) => {
                    tracing::warn!(
                        group = %name,
                        "the kafka group has members in other processes; left for Kafka to \
                         remove once it is empty"
                    );
                }
                Err((name, code @ RDKafkaErrorCode::GroupAuthorizationFailed)) => {
                    return Err(Error::Backend(format!(
                        "kafka: cannot delete group `{name}`: {code}"
                    )));
                }
                Err((name, code)) => {
                    return Err(unavailable(&format!("deleting group `{name}`"), code));
                }
            }
        }
        Ok(())
    }
}

/// The groups of `kafka_topic` among `groups`: those named `{kafka_topic}.{group}` with a valid
/// group name, except those that could be a group of another topic of `topics` whose name
/// starts with `{kafka_topic}.`.
fn groups_of(kafka_topic: &str, groups: &[String], topics: &[String]) -> Vec<String> {
    let prefix = format!("{kafka_topic}.");
    let longer: Vec<String> = topics
        .iter()
        .filter(|t| t.starts_with(&prefix))
        .map(|t| format!("{t}."))
        .collect();
    groups
        .iter()
        .filter(|g| {
            g.strip_prefix(&prefix)
                .is_some_and(|group| crate::validate_name("group", group).is_ok())
                && !longer.iter().any(|l| g.starts_with(l.as_str()))
        })
        .cloned()
        .collect()
}

fn encode(message: &Message) -> OwnedHeaders {
    let attempt = message.attempt.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(2 + message.headers.len())
        .insert(Header {
            key: ID_HEADER,
            value: Some(message.id.as_str()),
        })
        .insert(Header {
            key: ATTEMPT_HEADER,
            value: Some(attempt.as_str()),
        });
    for (name, value) in &message.headers {
        headers = headers.insert(Header {
            key: &format!("{USER_HEADER_PREFIX}{name}"),
            value: Some(value.as_str()),
        });
    }
    headers
}

/// The message of a received record; never fails, whoever published it.
fn decode(record: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    let mut id = None;
    let mut attempt = 1;
    let mut headers = BTreeMap::new();
    if let Some(record_headers) = record.headers() {
        for header in record_headers.iter() {
            let value = String::from_utf8_lossy(header.value.unwrap_or_default());
            if header.key == ID_HEADER {
                id = Some(value.into_owned());
            } else if header.key == ATTEMPT_HEADER {
                attempt = value.parse::<u32>().unwrap_or(1).max(1);
            } else if let Some(name) = header.key.strip_prefix(USER_HEADER_PREFIX) {
                headers.insert(name.to_owned(), value.into_owned());
            }
        }
    }
    Message {
        id: id.unwrap_or_else(|| format!("{}@{}", record.partition(), record.offset())),
        attempt,
        headers,
        payload: Bytes::copy_from_slice(record.payload().unwrap_or_default()),
    }
}

fn publish_error(err: &KafkaError, limit: Duration) -> Error {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => Error::Unavailable(format!(
            "kafka: the broker did not confirm the message within {limit:?}"
        )),
        Some(
            code @ (RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord),
        ) => Error::Backend(format!("kafka: the broker refused the message: {code}")),
        _ => unavailable("publishing", err),
    }
}

#[async_trait]
impl MessageQueue for KafkaQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        let shared = &self.shared;
        let limit = shared.options.bounds.publish_timeout;
        let started = Instant::now();
        let kafka_topic = shared.kafka_topic(topic);
        shared.ensure_topic(&kafka_topic, limit).await?;
        let left = limit.saturating_sub(started.elapsed());
        let record = FutureRecord::<(), [u8]>::to(&kafka_topic)
            .payload(&message.payload[..])
            .headers(encode(&message));
        // librdkafka gives up after `message.timeout.ms` (the publish timeout); the outer
        // timeout only guards against a missing delivery report.
        let sent = tokio::time::timeout(
            left + Duration::from_secs(1),
            shared.producer.send(record, left),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((err, _))) => Err(publish_error(&err, limit)),
            Err(_) => Err(Error::Unavailable(format!(
                "kafka: the broker did not confirm the message within {limit:?}"
            ))),
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Consumer>, Error> {
        crate::validate_name("topic", topic)?;
        crate::validate_name("group", group)?;
        let shared = &self.shared;
        let kafka_topic = shared.kafka_topic(topic);
        shared
            .ensure_topic(&kafka_topic, shared.options.bounds.publish_timeout)
            .await?;
        let group_id = format!("{kafka_topic}.{group}");
        let group = shared.group(&kafka_topic, group_id).await?;
        let deadlines = Arc::new(Deadlines::new());
        let watcher = tokio::spawn(
            Arc::clone(&deadlines).watch(|held: Arc<Held>| async move { held.deadline_reached() }),
        );
        Ok(Box::new(KafkaConsumer {
            group,
            ack_deadline: options.ack_deadline,
            deadlines,
            watcher,
        }))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        let kafka_topic = self.shared.kafka_topic(topic);
        self.shared
            .delete_topic(&kafka_topic)
            .await
            .map_err(|err| self.shared.secrets.scrub_error(err))
    }
}

/// A received record, not acked yet.
struct Pending {
    message: Message,
    partition: i32,
    offset: i64,
}

/// The offsets of one partition received and not yet acked.
struct PartitionOffsets {
    in_flight: BTreeSet<i64>,
    /// Just past the last offset received.
    next: i64,
    /// The last offset stored for commit.
    stored: i64,
}

impl PartitionOffsets {
    /// The bookkeeping of a partition whose first record received is at `offset`.
    fn starting_at(offset: i64) -> Self {
        Self {
            in_flight: BTreeSet::new(),
            next: offset,
            stored: offset,
        }
    }

    fn received(&mut self, offset: i64) {
        self.in_flight.insert(offset);
        self.next = self.next.max(offset + 1);
    }

    /// The record at `offset` is acked; returns the offset to store for commit when it moved:
    /// the lowest still in flight, else just past the last received.
    fn acked(&mut self, offset: i64) -> Option<i64> {
        self.in_flight.remove(&offset);
        let committable = self.in_flight.first().copied().unwrap_or(self.next);
        (committable > self.stored).then(|| {
            self.stored = committable;
            committable
        })
    }
}

/// The Kafka group member of this process for one group; shared by its local members.
struct Group {
    /// `None` once closed (its topic was removed): the rdkafka consumer is gone then.
    consumer: Mutex<Option<Arc<StreamConsumer<Logging>>>>,
    kafka_topic: String,
    /// Received records, in order, for the local members.
    fresh: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    /// Messages to hand out again, before fresh ones.
    redeliveries: Mutex<VecDeque<Pending>>,
    redelivered: Notify,
    offsets: Arc<Mutex<HashMap<i32, PartitionOffsets>>>,
    /// The task receiving from the rdkafka consumer; `None` once closed.
    receiver: Mutex<Option<JoinHandle<()>>>,
    /// Set when its topic was removed: it left the Kafka group and hands out nothing more.
    closed: AtomicBool,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(receiver) = lock(&self.receiver).take() {
            receiver.abort();
        }
    }
}

impl Group {
    async fn join(
        shared: &Arc<Shared>,
        kafka_topic: &str,
        group_id: &str,
    ) -> Result<Arc<Self>, Error> {
        let options = &shared.options;
        let bounds = &options.bounds;
        let consumer: StreamConsumer<Logging> = client_config(options)
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", millis(COMMIT_INTERVAL))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", millis(options.session_timeout))
            .set(
                "heartbeat.interval.ms",
                millis((options.session_timeout / 6).max(Duration::from_millis(100))),
            )
            .set("fetch.wait.max.ms", "100")
            .set("fetch.message.max.bytes", MAX_MESSAGE_BYTES.to_string())
            .create_with_context(Logging::new(&shared.secrets))
            .map_err(|err| {
                let err = Error::InvalidConfig(format!("kafka consumer: {err}"));
                shared.secrets.scrub_error(err)
            })?;
        let consumer = Arc::new(consumer);
        let start = Arc::clone(&consumer);
        let topic = kafka_topic.to_owned();
        let limit = bounds.publish_timeout;
        retry::bounded(bounds, limit, "joining a kafka group", || {
            let start = Arc::clone(&start);
            let topic = topic.clone();
            async move {
                tokio::task::spawn_blocking(move || start_at_end(&start, &topic, limit))
                    .await
                    .map_err(|err| Error::Backend(format!("kafka: joining a group: {err}")))?
            }
        })
        .await?;
        consumer
            .subscribe(&[kafka_topic])
            .map_err(|err| Error::Backend(format!("kafka: subscribing: {err}")))?;
        let (sender, receiver) = mpsc::channel(PREFETCH);
        let offsets = Arc::new(Mutex::new(HashMap::new()));
        let receiving = tokio::spawn(receive(Arc::clone(&consumer), Arc::clone(&offsets), sender));
        Ok(Arc::new(Self {
            consumer: Mutex::new(Some(consumer)),
            kafka_topic: kafka_topic.to_owned(),
            fresh: tokio::sync::Mutex::new(receiver),
            redeliveries: Mutex::new(VecDeque::new()),
            redelivered: Notify::new(),
            offsets,
            receiver: Mutex::new(Some(receiving)),
            closed: AtomicBool::new(false),
        }))
    }

    /// Its topic is being removed: ends the local members (what they hold settles as
    /// nothing), stops receiving, and closes the rdkafka consumer, which leaves the Kafka group
    /// and forgets the topic, within `limit`.
    async fn close(&self, limit: Duration) {
        self.closed.store(true, Ordering::SeqCst);
        lock(&self.redeliveries).clear();
        self.redelivered.notify_waiters();
        let receiver = lock(&self.receiver).take();
        if let Some(receiver) = receiver {
            receiver.abort();
            // Drops the task's handle on the consumer.
            let _ = receiver.await;
        }
        let consumer = lock(&self.consumer).take();
        if let Some(consumer) = consumer {
            // The last handle: dropping it closes the consumer, which blocks until it left the
            // group.
            let closing = tokio::task::spawn_blocking(move || {
                consumer.unsubscribe();
                drop(consumer);
            });
            if tokio::time::timeout(limit, closing).await.is_err() {
                tracing::warn!(
                    topic = %self.kafka_topic,
                    "a kafka group member did not leave its group within {limit:?}"
                );
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Hands `pending` to the local members again, with `attempt + 1`.
    fn redeliver(&self, mut pending: Pending) {
        if self.is_closed() {
            return;
        }
        pending.message.attempt = pending.message.attempt.saturating_add(1);
        lock(&self.redeliveries).push_back(pending);
        self.redelivered.notify_waiters();
    }

    /// The record at `partition`/`offset` is acked: its offset may be committed.
    fn done(&self, partition: i32, offset: i64) {
        if self.is_closed() {
            return;
        }
        let store = lock(&self.offsets)
            .get_mut(&partition)
            .and_then(|state| state.acked(offset));
        if let Some(committable) = store {
            self.store(partition, committable);
        }
    }

    fn store(&self, partition: i32, offset: i64) {
        let mut list = TopicPartitionList::new();
        if list
            .add_partition_offset(&self.kafka_topic, partition, Offset::Offset(offset))
            .is_err()
        {
            return;
        }
        let Some(consumer) = lock(&self.consumer).clone() else {
            return;
        };
        // Fails for a partition no longer assigned to this process; its new owner reads
        // from the last commit.
        if let Err(err) = consumer.store_offsets(&list) {
            tracing::debug!(partition, offset, error = %err, "cannot store a kafka offset");
        }
    }
}

/// Sets the committed offset of every partition of `topic` without one to the partition's
/// end, so that a new group starts with what is published after it joined.
fn start_at_end(
    consumer: &StreamConsumer<Logging>,
    topic: &str,
    limit: Duration,
) -> Result<(), Error> {
    let metadata = consumer
        .fetch_metadata(Some(topic), limit)
        .map_err(|err| unavailable("reading the topic's partitions", err))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::Unavailable(format!(
            "kafka: the topic `{topic}` has no partitions yet"
        )));
    }
    let mut list = TopicPartitionList::new();
    for &partition in &partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, limit)
        .map_err(|err| unavailable("reading the group's offsets", err))?;
    let mut start = TopicPartitionList::new();
    for element in committed.elements() {
        if matches!(element.offset(), Offset::Offset(_)) {
            continue;
        }
        let (_, high) = consumer
            .fetch_watermarks(topic, element.partition(), limit)
            .map_err(|err| unavailable("reading the topic's end", err))?;
        start
            .add_partition_offset(topic, element.partition(), Offset::Offset(high))
            .map_err(|err| Error::Backend(format!("kafka: {err}")))?;
    }
    if start.count() > 0 {
        consumer
            .commit(&start, CommitMode::Sync)
            .map_err(|err| unavailable("setting the group's start", err))?;
    }
    Ok(())
}

/// Receives the group's records into `sender` until the group is dropped. librdkafka
/// reconnects by itself; the errors it reports meanwhile (queued while the broker is down) are
/// only logged, at once, so that none of them delays the records behind them.
async fn receive(
    consumer: Arc<StreamConsumer<Logging>>,
    offsets: Arc<Mutex<HashMap<i32, PartitionOffsets>>>,
    sender: mpsc::Sender<Pending>,
) {
    loop {
        let pending = match consumer.recv().await {
            Ok(record) => {
                let partition = record.partition();
                let offset = record.offset();
                let message = decode(&record);
                let mut offsets = lock(&offsets);
                offsets
                    .entry(partition)
                    .or_insert_with(|| PartitionOffsets::starting_at(offset))
                    .received(offset);
                Pending {
                    message,
                    partition,
                    offset,
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "kafka consumer error; librdkafka retries");
                continue;
            }
        };
        if sender.send(pending).await.is_err() {
            return;
        }
    }
}

/// A delivery handed out.
struct Held {
    group: Arc<Group>,
    /// The message as delivered, kept for a redelivery.
    pending: Mutex<Option<Pending>>,
    /// The deadlines of the member that handed it out; gone once the member was dropped,
    /// which settled it.
    deadlines: Weak<Deadlines<Held>>,
    settlement: Settlement,
}

impl Settles for Held {
    fn settlement(&self) -> &Settlement {
        &self.settlement
    }
}

impl Held {
    /// The record, for the first of ack, nack, abandon, deadline and drop; `None` after.
    fn claim(&self) -> Option<Pending> {
        let deadlines = self.deadlines.upgrade()?;
        if !deadlines.claim(self) {
            return None;
        }
        lock(&self.pending).take()
    }

    fn deadline_reached(&self) {
        if let Some(pending) = self.claim() {
            tracing::debug!("ack deadline passed; redelivering");
            self.group.redeliver(pending);
        }
    }
}

/// Settles one delivery of a [`KafkaQueue`].
struct KafkaAcker(Arc<Held>);

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        if let Some(pending) = self.0.claim() {
            self.0.group.done(pending.partition, pending.offset);
        }
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error> {
        let Some(pending) = self.0.claim() else {
            return Ok(());
        };
        match delay.filter(|d| !d.is_zero()) {
            None => self.0.group.redeliver(pending),
            Some(delay) => {
                let group = Arc::downgrade(&self.0.group);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A group gone meanwhile left the offset uncommitted: whoever joins next
                    // receives the message from Kafka.
                    if let Some(group) = group.upgrade() {
                        group.redeliver(pending);
                    }
                });
            }
        }
        Ok(())
    }

    fn abandon(self: Box<Self>) {
        if let Some(pending) = self.0.claim() {
            self.0.group.redeliver(pending);
        }
    }
}

/// Routes librdkafka's log lines and errors to `tracing`, with the secrets of the options
/// hidden.
struct Logging {
    secrets: Arc<Secrets>,
}

impl Logging {
    fn new(secrets: &Arc<Secrets>) -> Self {
        Self {
            secrets: Arc::clone(secrets),
        }
    }
}

impl rdkafka::client::ClientContext for Logging {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, line: &str) {
        let line = self.secrets.scrub(line);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {line}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility, "librdkafka: {line}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {line}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Mostly a broker out of reach, which librdkafka retries by itself.
        let error = self.secrets.scrub(&error.to_string());
        let reason = self.secrets.scrub(reason);
        tracing::debug!(error = %error, "librdkafka: {reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for Logging {}

/// A local member of a group of a [`KafkaQueue`].
struct KafkaConsumer {
    group: Arc<Group>,
    ack_deadline: Duration,
    /// What this member handed out and has not settled.
    deadlines: Arc<Deadlines<Held>>,
    watcher: JoinHandle<()>,
}

impl KafkaConsumer {
    fn hand_out(&self, pending: Pending) -> Delivery {
        let message = pending.message.clone();
        let held = Arc::new(Held {
            group: Arc::clone(&self.group),
            pending: Mutex::new(Some(pending)),
            deadlines: Arc::downgrade(&self.deadlines),
            settlement: Settlement::default(),
        });
        self.deadlines
            .watch_until(Instant::now() + self.ack_deadline, &held);
        Delivery::new(message, Box::new(KafkaAcker(held)))
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn next(&mut self) -> Result<Delivery, Error> {
        loop {
            let group = Arc::clone(&self.group);
            let redelivered = group.redelivered.notified();
            let mut redelivered = std::pin::pin!(redelivered);
            redelivered.as_mut().enable();
            if group.is_closed() {
                return Err(Error::Closed);
            }
            if let Some(pending) = lock(&group.redeliveries).pop_front() {
                return Ok(self.hand_out(pending));
            }
            let fresh = async {
                let mut fresh = group.fresh.lock().await;
                fresh.recv().await
            };
            tokio::select! {
                biased;
                () = &mut redelivered => {}
                received = fresh => match received {
                    // What was received before the topic's removal went with it.
                    Some(_) if group.is_closed() => return Err(Error::Closed),
                    Some(pending) => return Ok(self.hand_out(pending)),
                    None => return Err(Error::Closed),
                },
            }
        }
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.watcher.abort();
        for held in self.deadlines.drain_unsettled() {
            if let Some(pending) = lock(&held.pending).take() {
                self.group.redeliver(pending);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rdkafka::client::ClientContext as _;
    use rdkafka::config::RDKafkaLogLevel;
    use rdkafka::error::KafkaError;

    use super::{KafkaOptions, Logging, PartitionOffsets};
    use crate::captured_logs::CapturedLogs;
    use crate::redact::Secrets;

    #[test]
    fn librdkafka_lines_show_no_secret() {
        let mut options = KafkaOptions::new("h:9092");
        options.extra = vec![("sasl.password".into(), "very-secret".into())];
        let logging = Logging::new(&Arc::new(Secrets::of_kafka(&options)));
        let (logs, _guard) = CapturedLogs::start();
        logging.log(
            RDKafkaLogLevel::Warning,
            "SASL",
            "authentication with very-secret failed",
        );
        logging.error(
            KafkaError::ClientCreation("refused very-secret".into()),
            "while reaching sasl_ssl://u:very-secret-too@h:9093",
        );
        let lines = logs.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in lines {
            assert!(!line.contains("very-secret"), "{line}");
            assert!(line.contains("***"), "{line}");
        }
    }

    /// Receives `received` from `first` on, then acks `acked` in turn; `expected` is what each
    /// ack stores for commit.
    fn check(first: i64, received: &[i64], acked: &[i64], expected: &[Option<i64>]) {
        let mut offsets = PartitionOffsets::starting_at(first);
        for &offset in received {
            offsets.received(offset);
        }
        let stored: Vec<Option<i64>> = acked.iter().map(|&o| offsets.acked(o)).collect();
        assert_eq!(stored, expected, "received {received:?}, acked {acked:?}");
    }

    #[test]
    fn the_groups_of_a_topic_are_those_no_longer_topic_may_own() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let groups = names(&[
            "deployd.t.workers",
            "deployd.t.audit.eu",
            "deployd.t.x.g",
            "deployd.t2.workers",
            "deployd.t.",
            "deployd.tx",
            "other",
        ]);
        // Topic `t.x` exists: `deployd.t.x.g` may be its group `g`, and is left.
        let topics = names(&["deployd.t", "deployd.t.x", "deployd.t2"]);
        assert_eq!(
            super::groups_of("deployd.t", &groups, &topics),
            names(&["deployd.t.workers", "deployd.t.audit.eu"])
        );
        // Without it, `deployd.t.x.g` can only be group `x.g` of `t`.
        let topics = names(&["deployd.t"]);
        assert_eq!(
            super::groups_of("deployd.t", &groups, &topics),
            names(&["deployd.t.workers", "deployd.t.audit.eu", "deployd.t.x.g"])
        );
    }

    #[test]
    fn only_the_contiguous_acked_prefix_is_committed() {
        check(5, &[5, 6, 7], &[5, 6, 7], &[Some(6), Some(7), Some(8)]);
        // An ack behind an unacked record stores nothing, until that one is acked.
        check(5, &[5, 6, 7], &[7, 6, 5], &[None, None, Some(8)]);
        check(
            0,
            &[0, 1, 2, 3],
            &[1, 0, 3, 2],
            &[None, Some(2), None, Some(4)],
        );
        // A repeated or unknown ack changes nothing.
        check(0, &[0, 1], &[0, 0, 9], &[Some(1), None, None]);
        // A record received twice (after a rebalance) is done with its first ack.
        check(3, &[3, 3, 4], &[3, 4], &[Some(4), Some(5)]);
    }
}
