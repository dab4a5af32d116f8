//! The message queue contract of deployd.
//!
//! Tasks reach services through a [`MessageQueue`]. This crate defines the contract every
//! backend keeps, the in-memory backend used by default ([`memory::MemoryQueue`]), the broker
//! backends behind Cargo features, [`connect`] to pick one from a [`QueueConfig`], and, behind
//! the `testing` feature, the conformance suite that every backend runs ([`testing`]).
//!
//! The contract:
//! - [`MessageQueue::publish`] returns once the queue holds the message (after the broker's
//!   publisher confirm where it has one). While the broker is unreachable it retries, and fails
//!   with [`Error::Unavailable`] after [`Bounds::publish_timeout`]: it never hangs.
//! - Consumers join a named *group* on a topic. Each message goes to exactly one member of a
//!   group (competing consumers); every group on a topic receives every message (fan-out).
//! - Delivery is at-least-once: a message is removed only when its [`Delivery`] is acked.
//!   A nack (optionally delayed) redelivers it with `attempt + 1`. A message held by a consumer
//!   that is dropped, or whose ack deadline passes, is redelivered to another member with
//!   `attempt + 1`. Dropping a [`Delivery`] without acking it counts as a nack without delay.
//! - A lost connection is retried with exponential backoff (`backon`) between
//!   [`Bounds::reconnect_min_delay`] and [`Bounds::reconnect_max_delay`]; reconnecting is
//!   invisible to callers, and a consumer waiting in [`Consumer::next`] waits through it.
//! - [`MessageQueue::delete_topic`] removes a topic with its groups and every message they
//!   hold, on the broker too; the queue's consumers of it end with [`Error::Closed`], and the
//!   topic starts again empty when it is next used. Each backend's docs say what it deletes
//!   and what it leaves (NATS's large payloads to their TTL; Kafka groups that other processes
//!   still belong to).
//!
//! This crate does not know what a task is: messages are bytes plus headers.
//!
//! ## Credentials
//!
//! Broker URLs and settings carry passwords and tokens; what this crate shows does not. Debug
//! output of the options, [`QueueConfig::describe`] and the addresses quoted in errors go
//! through one redactor, [`redact_url`] (single URLs, server lists, tokens, secret query
//! parameters). Where a client library's text may quote an address or a setting (connecting,
//! reconnecting, creating a client, librdkafka's log lines), every URL in it is redacted and
//! every secret of the configuration replaced. The NATS client gets server addresses without
//! user info (its debug logs print them) and the credentials through its options.
//! [`QueueConfig::validate`] (run by [`connect`] and each backend's `connect`) turns a
//! malformed address into [`Error::InvalidConfig`] before any connection attempt.
//!
//! ## Backends
//!
//! | backend | feature | order | nack delay | ack deadline | attempt |
//! | --- | --- | --- | --- | --- | --- |
//! | [`memory`] | (always) | publish order per group; due redeliveries first | in-process timer | in-process timer per delivery | counted in the message |
//! | `redis` (Streams) | `redis` | publish order; redeliveries first | sorted set per group, moved to the group's retry stream when due | holder's deadline in its consumer name; idle entries (`XPENDING`) copied to the retry stream by a Lua script | field of the entry, `+ 1` per copy |
//! | `rabbitmq` (lapin) | `rabbitmq` | publish order per queue; redeliveries go last | per-delay queue with TTL dead-lettering into the group's queue | client timer; the broker requeues what a closed channel held | header, `+ 1` per copy, `+ 1` if the broker flags `redelivered` |
//! | `nats` (JetStream) | `nats` | publish order per subject | `NAK` with delay | client timer (`NAK`), `AckWait` longer for dead processes | JetStream's delivery count |
//! | `kafka` (rdkafka) | `kafka` | publish order per partition (one partition per topic by default); redeliveries first | in-process timer, then handed to the process's members again; the offset stays uncommitted meanwhile | client timer per delivery | header, `+ 1` per in-process redelivery; as published after a crash |
//! | `sqs` | `sqs` | none guaranteed (standard queues) | `ChangeMessageVisibility` (whole seconds) | client timer; visibility timeout one second longer for dead processes | `ApproximateReceiveCount` |
//!
//! Every broker backend redelivers what a dropped [`Consumer`] held at once; what a crashed
//! process held comes back after the broker-side timeout (Kafka: the group's session timeout,
//! after which the partition's new owner reads on from the last committed offset). Each
//! module's docs describe its layout on the broker.
//!
//! ## Testing against brokers
//!
//! `tests/{redis,rabbitmq,nats,kafka,sqs}.rs` run the whole conformance suite against a real broker;
//! each needs its feature and `testing`, so a plain `cargo test` does not build them. They read
//! `DEPLOYD_TEST_REDIS_URL`, `DEPLOYD_TEST_RABBITMQ_URL`, `DEPLOYD_TEST_NATS_URL`,
//! `DEPLOYD_TEST_KAFKA_BROKERS` and `DEPLOYD_TEST_SQS_ENDPOINT` (defaults: the usual ports on
//! 127.0.0.1) and fail when the broker does not answer. `cargo xtask e2e` starts what is not
//! running. The fault cases (publish while the broker is down, reconnect after a restart)
//! restart a private `redis-server` / `nats-server` that the test starts, and put a
//! [`testing::TcpProxy`] in front of RabbitMQ, moto and a private tansu, which the test cannot
//! restart (RabbitMQ is a slow system service; moto and tansu, whose only storage here is
//! memory, lose every queue and topic when restarted).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

mod address;
#[cfg(all(
    test,
    any(
        feature = "redis",
        feature = "rabbitmq",
        feature = "nats",
        feature = "kafka",
        feature = "sqs"
    )
))]
mod captured_logs;
pub mod config;
pub mod memory;
mod redact;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "nats",
    feature = "kafka",
    feature = "sqs"
))]
mod retry;

#[cfg(any(
    feature = "rabbitmq",
    feature = "nats",
    feature = "kafka",
    feature = "sqs"
))]
mod deadline;

#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "nats",
    feature = "sqs"
))]
mod removal;

#[cfg(feature = "kafka")]
pub mod kafka;

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;

pub use config::{Bounds, QueueConfig, connect};
pub use redact::redact_url;

/// What can go wrong talking to a queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue is closed (shut down); no further messages can be published or received.
    #[error("the queue is closed")]
    Closed,
    /// A topic or group name the backend cannot use.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// What the name names: `topic` or `group`.
        what: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker could not be reached within the configured bound.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Any other backend failure, with the backend's message.
    #[error("queue backend error: {0}")]
    Backend(String),
    /// The configuration names a backend this build of deployd-queue does not include.
    #[error("{}", unsupported_message(backend, feature))]
    Unsupported {
        /// The backend, as a person would name it (`Redis`, `RabbitMQ`, ...).
        backend: &'static str,
        /// The Cargo feature of `deployd-queue` that includes it; empty for a backend no
        /// feature provides yet (Kafka).
        feature: &'static str,
    },
    /// The configuration is unusable (a malformed URL, a missing field).
    #[error("invalid message queue configuration: {0}")]
    InvalidConfig(String),
}

fn unsupported_message(backend: &str, feature: &str) -> String {
    if feature.is_empty() {
        format!("the {backend} message queue is not implemented in this version of deployd")
    } else {
        format!(
            "the {backend} message queue is not built in: rebuild deployd-queue with the \
             `{feature}` feature"
        )
    }
}

/// A message: bytes plus headers, with a unique id and a delivery attempt number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique id, assigned by [`Message::new`]; kept across redeliveries.
    pub id: String,
    /// 1 on the first delivery, incremented by every redelivery.
    pub attempt: u32,
    /// Free-form headers.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub payload: Bytes,
}

impl Message {
    /// A new message with a fresh unique id and attempt 1.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            attempt: 1,
            headers: BTreeMap::new(),
            payload: payload.into(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }
}

/// How a consumer joins a group.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// A delivery not acked or nacked within this time is redelivered to another member.
    pub ack_deadline: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            ack_deadline: Duration::from_secs(30),
        }
    }
}

impl SubscribeOptions {
    /// Sets the ack deadline.
    pub fn ack_deadline(mut self, deadline: Duration) -> Self {
        self.ack_deadline = deadline;
        self
    }
}

/// A message queue backend.
#[async_trait]
pub trait MessageQueue: Send + Sync + 'static {
    /// Publishes `message` on `topic`; returns once the queue holds it.
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error>;

    /// Joins consumer group `group` on `topic`. The group is created on first use and starts
    /// with the messages published after its creation.
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Consumer>, Error>;

    /// Removes `topic` and every group on it from the queue: the messages it holds, its
    /// groups' pending and delayed messages, and what the broker keeps for it (streams,
    /// exchanges, queues, consumers, Kafka topics and consumer groups; each backend's docs say
    /// what it removes and what it leaves). Consumers of it that this queue opened end with
    /// [`Error::Closed`], and a delivery they still hold settles as nothing: no old message
    /// comes back from them. Removing a topic that does not exist is `Ok`; a name the backend
    /// cannot use is [`Error::InvalidName`]. A topic published to or subscribed to after its
    /// removal is created again, empty.
    ///
    /// Members of the topic's groups in other processes are not told: depending on the
    /// backend they see no more messages, fail and retry, or create their group again (empty)
    /// when they reconnect. Stop them before removing the topic.
    async fn delete_topic(&self, topic: &str) -> Result<(), Error>;
}

/// A member of a consumer group. Dropping it redelivers every message it holds unacked.
#[async_trait]
pub trait Consumer: Send {
    /// Waits for the next message for this member.
    ///
    /// Cancel safe: dropping the returned future before it completes loses no message, so
    /// `next` may be raced against a shutdown signal or a timeout.
    async fn next(&mut self) -> Result<Delivery, Error>;
}

/// A received message, to be acked or nacked exactly once.
pub struct Delivery {
    /// The message, with its attempt number for this delivery.
    pub message: Message,
    acker: Option<Box<dyn Acker>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Builds a delivery; for backend implementations.
    pub fn new(message: Message, acker: Box<dyn Acker>) -> Self {
        Self {
            message,
            acker: Some(acker),
        }
    }

    /// Removes the message from the group for good.
    pub async fn ack(mut self) -> Result<(), Error> {
        match self.acker.take() {
            Some(acker) => acker.ack().await,
            None => Ok(()),
        }
    }

    /// Hands the message back for redelivery with `attempt + 1`, after `delay` if given.
    pub async fn nack(mut self, delay: Option<Duration>) -> Result<(), Error> {
        match self.acker.take() {
            Some(acker) => acker.nack(delay).await,
            None => Ok(()),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            acker.abandon();
        }
    }
}

/// Settles one delivery; implemented by backends.
#[async_trait]
pub trait Acker: Send + Sync {
    /// See [`Delivery::ack`].
    async fn ack(self: Box<Self>) -> Result<(), Error>;
    /// See [`Delivery::nack`].
    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error>;
    /// The delivery was dropped unsettled: redeliver it as soon as possible. Must not block.
    fn abandon(self: Box<Self>);
}

/// Checks a topic or group name: 1 to 200 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        Some("must not be empty".to_owned())
    } else if name.len() > 200 {
        Some("is longer than 200 characters".to_owned())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| format!("contains `{c}`; use letters, digits, `.`, `_` and `-`"))
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}
