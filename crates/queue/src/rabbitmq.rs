//! The RabbitMQ backend (feature `rabbitmq`), on AMQP 0-9-1 through lapin.
//!
//! Layout, for topic `t`, group `g` and prefix `p`:
//! - exchange `p.t`, of type `fanout`, durable: `publish` sends there (persistent messages,
//!   publisher confirms: it returns once the broker confirmed).
//! - queue `p.t.g`, durable, bound to the exchange: the group. Every group's queue gets every
//!   message (fan-out); the members of a group consume from its queue and the broker hands each
//!   message to one of them (competing consumers), with manual acks and a prefetch of
//!   [`RabbitMqOptions::prefetch`]. Names longer than AMQP's 255 bytes are shortened with a hash.
//! - queues `p.t.g.delay.{ms}`, one per nack delay in use: a nack with a delay publishes a copy
//!   there; the queue's message TTL is the delay and it dead-letters into `p.t.g`. Each expires
//!   a minute after its last use.
//!
//! The attempt number is the `x-deployd-attempt` header plus one when the broker flags the
//! delivery `redelivered` (it requeued the message after a consumer's channel closed: a
//! dropped consumer or a crashed process). A nack publishes a copy with `attempt + 1` to the
//! group's queue (or a delay queue), waits for its confirm, then acks the original. The ack
//! deadline is kept by the client: a delivery not settled in time is handed back like a nack,
//! and a late ack or nack of it does nothing. A delivery the broker pushed ahead (prefetch) that
//! no `next` took within the member's ack deadline goes back to the queue unchanged, so a
//! member that stopped asking does not sit on messages. A consumer that is dropped closes its
//! channel, and the broker requeues what it held.
//!
//! Removing a topic ([`MessageQueue::delete_topic`]) deletes the exchange, the groups' queues
//! and their delay queues. AMQP 0-9-1 cannot list an exchange's bindings, so the groups and
//! delay queues of a topic are recorded on the broker, in two durable queues of the topic:
//! `p.t:groups` gets the group's name at every `subscribe` (the newest 10,000 are kept),
//! `p.t:delays` gets `{ms} {group}` when a process first uses a delay queue and again at most
//! once a minute while it does (the newest 1,000 are kept: a delay queue outlives its last use
//! by a minute only). `delete_topic` reads both records (the names are checked and the queue names
//! recomputed, so nothing outside the topic's layout is deleted), adds what this process
//! declared, and deletes the delay queues, the group queues, the exchange and the two record
//! queues. With [`RabbitMqOptions::group_expiry`] the record queues expire like the groups:
//! a group subscribed to last longer ago than that may be missed by another process (not by
//! the one that subscribed), and is then left to expire by itself. The topic's members in this
//! process end with [`Error::Closed`](crate::Error::Closed); members in other processes see
//! their queue deleted (the broker cancels their consumers) and declare it again, empty, when
//! they reconnect.
//!
//! Order: RabbitMQ keeps publish order within a queue; a single member receives a topic's
//! messages in order; redeliveries go to the back of the queue.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use crate::config::RabbitMqOptions;
use crate::deadline::{Deadlines, Settlement, Settles};
use crate::redact::Secrets;
use crate::removal::{Removal, Removals};
use crate::retry::{self, Reconnect};
use crate::{Acker, Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

const ATTEMPT_HEADER: &str = "x-deployd-attempt";
const HEADER_PREFIX: &str = "h:";
/// How long an unused delay queue outlives its delay.
const DELAY_QUEUE_LINGER: Duration = Duration::from_secs(60);

/// The durable records of a topic's groups and delay queues on the broker; see the module docs.
#[derive(Debug, Clone, Copy)]
enum Registry {
    /// `p.t:groups`: a group name per `subscribe`.
    Groups,
    /// `p.t:delays`: `{ms} {group}` per delay queue in use, at most once a minute per process.
    Delays,
}

impl Registry {
    fn suffix(self) -> &'static str {
        match self {
            Self::Groups => ":groups",
            Self::Delays => ":delays",
        }
    }

    /// The records kept at most; the oldest go first.
    fn max_length(self) -> i64 {
        match self {
            Self::Groups => 10_000,
            Self::Delays => 1_000,
        }
    }
}

/// What this process declared for one topic.
#[derive(Default, Clone)]
struct Known {
    groups: BTreeSet<String>,
    /// Delay queues by group and delay (ms), with when they were last recorded.
    delays: HashMap<(String, u64), Instant>,
}

/// A [`MessageQueue`] on RabbitMQ. See the [module docs](self).
///
/// Cloning is cheap and yields another handle on the same connection.
#[derive(Clone)]
pub struct RabbitMqQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RabbitMqQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqQueue")
            .field("exchange_prefix", &self.shared.options.exchange_prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: RabbitMqOptions,
    /// `options.url` parsed, with the vhost and host read as llama_deploy's client reads them.
    uri: AMQPUri,
    secrets: Secrets,
    link: tokio::sync::Mutex<Option<Link>>,
    /// What this process declared, by topic, for `delete_topic`.
    known: Mutex<HashMap<String, Known>>,
    /// The topics this queue removed, for its members.
    removals: Removals,
}

/// A live connection and its publishing channel (with publisher confirms).
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    publisher: Channel,
    /// Exchanges declared on this connection.
    declared: Arc<Mutex<std::collections::HashSet<String>>>,
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("rabbitmq: {what}: {err}"))
}

impl RabbitMqQueue {
    /// Connects to the broker of `options.url`; fails with [`Error::InvalidConfig`] for a
    /// malformed URL before connecting, and with [`Error::Unavailable`] when the broker does
    /// not answer within the connect timeout.
    pub async fn connect(options: RabbitMqOptions) -> Result<Self, Error> {
        if options.prefetch < 1 {
            return Err(Error::InvalidConfig(
                "rabbitmq prefetch must be at least 1".into(),
            ));
        }
        options.validate()?;
        let secrets = Secrets::of_url(&options.url);
        let uri = amqp_uri(&options.url).map_err(|problem| {
            crate::address::invalid("RabbitMQ URL", &options.url, secrets.scrub(&problem))
        })?;
        let shared = Arc::new(Shared {
            options,
            uri,
            secrets,
            link: tokio::sync::Mutex::new(None),
            known: Mutex::default(),
            removals: Removals::default(),
        });
        let bounds = shared.options.bounds.clone();
        retry::bounded(
            &bounds,
            bounds.connect_timeout,
            "connecting to rabbitmq",
            || shared.link(),
        )
        .await?;
        Ok(Self { shared })
    }
}

/// `url` parsed by lapin, with the vhost of [`crate::address::amqp_vhost`] (lapin reads the
/// path `/` as the empty vhost) and the host as written (lapin takes an IPv6 address for
/// `localhost`).
fn amqp_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.trim().parse()?;
    uri.vhost = crate::address::amqp_vhost(url);
    uri.authority.host = crate::address::Parts::split(url.trim()).host_name();
    Ok(uri)
}

impl Shared {
    /// The live link, connecting if there is none or it broke.
    async fn link(&self) -> Result<Link, Error> {
        self.connect_link()
            .await
            .map_err(|err| self.secrets.scrub_error(err))
    }

    async fn connect_link(&self) -> Result<Link, Error> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref() {
            if link.connection.status().connected() && link.publisher.status().connected() {
                return Ok(link.clone());
            }
            *slot = None;
        }
        let connect = Connection::connect_uri(self.uri.clone(), ConnectionProperties::default());
        let connection =
            match tokio::time::timeout(self.options.bounds.connect_timeout, connect).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(err)) => return Err(unavailable("connecting", err)),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "rabbitmq: no connection within {:?}",
                        self.options.bounds.connect_timeout
                    )));
                }
            };
        let publisher = connection
            .create_channel()
            .await
            .map_err(|err| unavailable("opening a channel", err))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| unavailable("enabling publisher confirms", err))?;
        let link = Link {
            connection: Arc::new(connection),
            publisher,
            declared: Arc::default(),
        };
        *slot = Some(link.clone());
        Ok(link)
    }

    fn exchange(&self, topic: &str) -> String {
        amqp_name(&[&self.options.exchange_prefix, topic], "")
    }

    fn queue(&self, topic: &str, group: &str) -> String {
        amqp_name(&[&self.options.exchange_prefix, topic, group], "")
    }

    /// Publishes `message` to `exchange` with `routing_key` and waits for the confirm.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        expiration: Option<u64>,
    ) -> Result<(), Error> {
        let properties = properties(message, expiration);
        let bounds = &self.options.bounds;
        retry::bounded(
            bounds,
            bounds.publish_timeout,
            "publishing to rabbitmq",
            || {
                let properties = properties.clone();
                async move {
                    let link = self.link().await?;
                    if !exchange.is_empty() {
                        declare_exchange(&link, exchange).await?;
                    }
                    let confirm = link
                        .publisher
                        .basic_publish(
                            exchange.into(),
                            routing_key.into(),
                            BasicPublishOptions::default(),
                            &message.payload,
                            properties,
                        )
                        .await
                        .map_err(|err| unavailable("publishing", err))?;
                    match confirm
                        .await
                        .map_err(|err| unavailable("publishing", err))?
                    {
                        Confirmation::Nack(_) => Err(Error::Unavailable(
                            "rabbitmq: the broker refused the message (nack)".to_owned(),
                        )),
                        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
                    }
                }
            },
        )
        .await
    }

    /// The delay queue of group queue `queue` for a delay of `ms`.
    fn delay_queue(queue: &str, ms: u64) -> String {
        amqp_name(&[queue], &format!(".delay.{ms}"))
    }

    /// The queue of `topic`'s records of `registry`.
    fn registry(&self, topic: &str, registry: Registry) -> String {
        amqp_name(&[&self.options.exchange_prefix, topic], registry.suffix())
    }

    /// Declares `topic`'s record queue of `registry` on `channel`; returns how many records it
    /// holds.
    async fn declare_registry(
        &self,
        channel: &Channel,
        topic: &str,
        registry: Registry,
    ) -> Result<u32, Error> {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(registry.max_length()),
        );
        if let Some(expiry) = self.options.group_expiry {
            let ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX).max(1);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        let declared = channel
            .queue_declare(
                self.registry(topic, registry).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|err| unavailable("declaring a topic's records", err))?;
        Ok(declared.message_count())
    }

    /// Adds `record` to `topic`'s records of `registry`, within the publish timeout.
    async fn record(&self, topic: &str, registry: Registry, record: &str) -> Result<(), Error> {
        let bounds = &self.options.bounds;
        retry::bounded(
            bounds,
            bounds.publish_timeout,
            "declaring a topic's records",
            || async {
                let link = self.link().await?;
                let channel = link
                    .connection
                    .create_channel()
                    .await
                    .map_err(|err| unavailable("opening a channel", err))?;
                let declared = self.declare_registry(&channel, topic, registry).await;
                let _ = channel.close(200, "done".into()).await;
                declared.map(|_| ())
            },
        )
        .await?;
        let name = self.registry(topic, registry);
        self.send("", &name, &Message::new(record.to_owned()), None)
            .await
    }

    /// `topic`'s group `group` was subscribed to: known here, and recorded on the broker.
    async fn note_group(&self, topic: &str, group: &str) -> Result<(), Error> {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(topic.to_owned())
            .or_default()
            .groups
            .insert(group.to_owned());
        self.record(topic, Registry::Groups, group).await
    }

    /// `member`'s delay queue for `ms` is in use: known here, and recorded on the broker unless
    /// this process did within the last minute.
    async fn note_delay(&self, member: &MemberState, ms: u64) {
        let due = {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            let delays = &mut known.entry(member.topic.clone()).or_default().delays;
            let key = (member.group.clone(), ms);
            let due = delays
                .get(&key)
                .is_none_or(|recorded| recorded.elapsed() >= DELAY_QUEUE_LINGER);
            if due {
                delays.insert(key, Instant::now());
            }
            due
        };
        if due {
            let record = format!("{ms} {}", member.group);
            if let Err(err) = self.record(&member.topic, Registry::Delays, &record).await {
                tracing::warn!(
                    queue = %member.queue,
                    error = %err,
                    "cannot record a delay queue; removing the topic from another process may \
                     leave it to expire by itself"
                );
            }
        }
    }

    /// Reads and holds (unacked, on `channel`) every record of `topic`'s `registry`.
    async fn read_registry(
        &self,
        channel: &Channel,
        topic: &str,
        registry: Registry,
    ) -> Result<Vec<String>, Error> {
        let count = self.declare_registry(channel, topic, registry).await?;
        let name = self.registry(topic, registry);
        let mut records = Vec::new();
        // Bounded by the count seen, so that records added meanwhile cannot keep it going.
        for _ in 0..count {
            let got = channel
                .basic_get(name.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|err| unavailable("reading a topic's records", err))?;
            let Some(got) = got else {
                break;
            };
            records.push(String::from_utf8_lossy(&got.delivery.data).into_owned());
        }
        Ok(records)
    }

    /// Deletes `topic`'s delay queues, group queues, exchange and records.
    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        let link = self.link().await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|err| unavailable("opening a channel", err))?;
        let deleted = self.delete_topic_on(&channel, topic).await;
        let _ = channel.close(200, "done".into()).await;
        deleted?;
        let exchange = self.exchange(topic);
        link.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&exchange);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        Ok(())
    }

    async fn delete_topic_on(&self, channel: &Channel, topic: &str) -> Result<(), Error> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .cloned()
            .unwrap_or_default();
        let mut groups = known.groups;
        let mut delays: BTreeSet<(String, u64)> = known.delays.into_keys().collect();
        for group in self.read_registry(channel, topic, Registry::Groups).await? {
            if crate::validate_name("group", &group).is_ok() {
                groups.insert(group);
            }
        }
        for record in self.read_registry(channel, topic, Registry::Delays).await? {
            let parsed = record.split_once(' ').and_then(|(ms, group)| {
                let ms = ms.parse::<u64>().ok()?;
                crate::validate_name("group", group).ok()?;
                Some((group.to_owned(), ms))
            });
            if let Some(delay) = parsed {
                delays.insert(delay);
            }
        }
        let delete_queue = |name: String| async move {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|err| unavailable(&format!("deleting queue `{name}`"), err))
        };
        // The delay queues first: what expires meanwhile goes to a group queue still there.
        for (group, ms) in &delays {
            delete_queue(Self::delay_queue(&self.queue(topic, group), *ms)).await?;
        }
        for group in &groups {
            delete_queue(self.queue(topic, group)).await?;
        }
        let exchange = self.exchange(topic);
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|err| unavailable(&format!("deleting exchange `{exchange}`"), err))?;
        for registry in [Registry::Groups, Registry::Delays] {
            // With the records this channel holds.
            delete_queue(self.registry(topic, registry)).await?;
        }
        Ok(())
    }

    /// Hands `message` back to `member`'s group queue with `attempt`, after `delay`.
    async fn hand_back(
        &self,
        member: &MemberState,
        message: &Message,
        delay: Option<Duration>,
    ) -> Result<(), Error> {
        let queue = member.queue.as_str();
        match delay.filter(|d| !d.is_zero()) {
            None => self.send("", queue, message, None).await,
            Some(delay) => {
                let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                // A TTL is at most 2^32 - 1 ms in RabbitMQ.
                let ms = ms.min(u64::from(u32::MAX) - DELAY_QUEUE_LINGER.as_millis() as u64);
                let delay_queue = Self::delay_queue(queue, ms);
                let bounds = &self.options.bounds;
                retry::bounded(
                    bounds,
                    bounds.publish_timeout,
                    "declaring a delay queue",
                    || {
                        let delay_queue = delay_queue.clone();
                        async move {
                            let link = self.link().await?;
                            let mut args = FieldTable::default();
                            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
                            args.insert(
                                "x-expires".into(),
                                AMQPValue::LongLongInt(
                                    (ms + DELAY_QUEUE_LINGER.as_millis() as u64) as i64,
                                ),
                            );
                            args.insert(
                                "x-dead-letter-exchange".into(),
                                AMQPValue::LongString("".into()),
                            );
                            args.insert(
                                "x-dead-letter-routing-key".into(),
                                AMQPValue::LongString(queue.into()),
                            );
                            let channel = link
                                .connection
                                .create_channel()
                                .await
                                .map_err(|err| unavailable("opening a channel", err))?;
                            let declared = channel
                                .queue_declare(
                                    delay_queue.as_str().into(),
                                    QueueDeclareOptions {
                                        durable: true,
                                        ..QueueDeclareOptions::default()
                                    },
                                    args,
                                )
                                .await;
                            let _ = channel.close(200, "done".into()).await;
                            declared.map_err(|err| unavailable("declaring a delay queue", err))?;
                            Ok(())
                        }
                    },
                )
                .await?;
                self.note_delay(member, ms).await;
                self.send("", &delay_queue, message, None).await
            }
        }
    }
}

async fn declare_exchange(link: &Link, exchange: &str) -> Result<(), Error> {
    if link
        .declared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(exchange)
    {
        return Ok(());
    }
    link.publisher
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| unavailable("declaring an exchange", err))?;
    link.declared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(exchange.to_owned());
    Ok(())
}

/// `parts` joined with `.`, plus `suffix`; shortened with a hash of the whole to fit AMQP's
/// 255 bytes.
fn amqp_name(parts: &[&str], suffix: &str) -> String {
    let name = parts.join(".");
    if name.len() + suffix.len() <= 255 {
        return format!("{name}{suffix}");
    }
    // FNV-1a, 64 bits: stable across runs and machines.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let keep = 255 - suffix.len() - 17;
    format!("{}.{hash:016x}{suffix}", &name[..keep])
}

fn properties(message: &Message, expiration: Option<u64>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(message.attempt)),
    );
    for (name, value) in &message.headers {
        headers.insert(
            format!("{HEADER_PREFIX}{name}").into(),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
    let properties = BasicProperties::default()
        .with_message_id(message.id.as_str().into())
        .with_delivery_mode(2)
        .with_headers(headers);
    match expiration {
        Some(ms) => properties.with_expiration(ms.to_string().into()),
        None => properties,
    }
}

/// The message of a delivery; see the module docs for the attempt number.
fn decode(delivery: &lapin::message::Delivery) -> Message {
    let properties = &delivery.properties;
    let mut attempt = 1u32;
    let mut headers = BTreeMap::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            if name == ATTEMPT_HEADER {
                attempt = match value {
                    AMQPValue::LongLongInt(n) => u32::try_from(*n).unwrap_or(1),
                    AMQPValue::LongInt(n) => u32::try_from(*n).unwrap_or(1),
                    AMQPValue::LongUInt(n) => *n,
                    _ => 1,
                };
            } else if let Some(header) = name.strip_prefix(HEADER_PREFIX) {
                let text = match value {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.as_str().to_owned(),
                    _ => continue,
                };
                headers.insert(header.to_owned(), text);
            }
        }
    }
    if delivery.redelivered {
        attempt = attempt.saturating_add(1);
    }
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    Message {
        id,
        attempt,
        headers,
        payload: Bytes::from(delivery.data.clone()),
    }
}

#[async_trait]
impl MessageQueue for RabbitMqQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        let exchange = self.shared.exchange(topic);
        self.shared.send(&exchange, "", &message, None).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Consumer>, Error> {
        crate::validate_name("topic", topic)?;
        crate::validate_name("group", group)?;
        // Recorded before the queue is declared: a failure leaves no consuming channel behind.
        self.shared.note_group(topic, group).await?;
        let state = Arc::new(MemberState {
            shared: Arc::clone(&self.shared),
            topic: topic.to_owned(),
            group: group.to_owned(),
            removal: self.shared.removals.watch(topic),
            exchange: self.shared.exchange(topic),
            queue: self.shared.queue(topic, group),
            ack_deadline: options.ack_deadline,
            buffer: Mutex::new(VecDeque::new()),
            stream: tokio::sync::Mutex::new(None),
            deadlines: Arc::new(Deadlines::new()),
            channel: Mutex::new(None),
        });
        let bounds = &self.shared.options.bounds;
        let stream = retry::bounded(
            bounds,
            bounds.publish_timeout,
            "subscribing on rabbitmq",
            || state.open(),
        )
        .await?;
        *state.stream.lock().await = Some(stream);
        let pump = tokio::spawn(Arc::clone(&state).tend());
        let watcher = tokio::spawn(Arc::clone(&state.deadlines).watch(
            |held: Arc<Held>| async move {
                if held.claim() {
                    tracing::debug!(id = %held.message.id, "ack deadline passed; redelivering");
                    if let Err(err) = held.redeliver(None).await {
                        tracing::warn!(error = %err, "cannot redeliver a message past its ack deadline");
                    }
                }
            },
        ));
        Ok(Box::new(RabbitMqConsumer {
            state,
            pump: Some(pump),
            watcher,
        }))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        // First, so that no member of this process declares its queue again meanwhile.
        self.shared.removals.remove(topic);
        let bounds = &self.shared.options.bounds;
        retry::bounded(
            bounds,
            bounds.publish_timeout,
            "deleting a topic on rabbitmq",
            || self.shared.delete_topic(topic),
        )
        .await
        .map_err(|err| self.shared.secrets.scrub_error(err))
    }
}

/// A delivery the broker pushed, not yet handed out.
struct Pushed {
    arrived: Instant,
    delivery: lapin::message::Delivery,
}

/// One member: its queue, what the broker pushed to it, and what it handed out.
struct MemberState {
    shared: Arc<Shared>,
    topic: String,
    group: String,
    /// Fires when this queue removes the topic: the member ends, and hands nothing back.
    removal: Removal,
    exchange: String,
    queue: String,
    ack_deadline: Duration,
    buffer: Mutex<VecDeque<Pushed>>,
    /// The deliveries the broker pushes; `None` while the channel is broken. Whoever holds the
    /// lock reads it: `next`, or the tending task while no `next` waits.
    stream: tokio::sync::Mutex<Option<lapin::Consumer>>,
    /// Handed out and not settled.
    deadlines: Arc<Deadlines<Held>>,
    /// The channel consuming for this member.
    channel: Mutex<Option<Channel>>,
}

impl MemberState {
    /// Opens a channel and starts consuming the group's queue, declaring what is missing.
    async fn open(&self) -> Result<lapin::Consumer, Error> {
        let link = self.shared.link().await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|err| unavailable("opening a channel", err))?;
        declare_exchange(&link, &self.exchange).await?;
        let mut arguments = FieldTable::default();
        if let Some(expiry) = self.shared.options.group_expiry {
            let ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX).max(1);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|err| unavailable("declaring a queue", err))?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| unavailable("binding a queue", err))?;
        channel
            .basic_qos(
                self.shared.options.prefetch.max(1),
                BasicQosOptions::default(),
            )
            .await
            .map_err(|err| unavailable("setting the prefetch", err))?;
        let tag: ShortString = format!("deployd-{}", uuid::Uuid::new_v4().simple()).into();
        let stream = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| unavailable("consuming", err))?;
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel);
        Ok(stream)
    }

    /// Waits for the broker to push a delivery into the buffer, reopening the channel when it
    /// broke. `stream` is the member's stream, locked by the caller.
    async fn pull(&self, stream: &mut Option<lapin::Consumer>) {
        if let Some(consumer) = stream.as_mut() {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    self.push(delivery);
                    return;
                }
                Some(Err(err)) => {
                    tracing::warn!(queue = %self.queue, error = %err, "rabbitmq consumer lost its channel; reconnecting");
                }
                None => {
                    tracing::warn!(queue = %self.queue, "rabbitmq consumer lost its channel; reconnecting");
                }
            }
            *stream = None;
            // The broker requeues everything the channel held.
            self.forget_channel();
        }
        let mut reconnect = Reconnect::new(&self.shared.options.bounds);
        loop {
            if self.removal.is_removed() {
                // The queue went with the topic: do not declare it again.
                return;
            }
            match self.open().await {
                Ok(new_stream) => {
                    *stream = Some(new_stream);
                    return;
                }
                Err(err) => reconnect.pause("rabbitmq reconnect", &err).await,
            }
        }
    }

    fn push(&self, delivery: lapin::message::Delivery) {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Pushed {
                arrived: Instant::now(),
                delivery,
            });
    }

    /// While no `next` waits: moves what the broker pushed into the buffer, and hands back
    /// what waited there past the ack deadline.
    async fn tend(self: Arc<Self>) {
        let check =
            (self.ack_deadline / 2).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(check);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if self.removal.is_removed() {
                // What the broker pushed went with the topic.
                self.forget_channel();
                return;
            }
            if let Ok(mut stream) = self.stream.try_lock()
                && let Some(consumer) = stream.as_mut()
            {
                while let Some(item) = consumer.next().now_or_never() {
                    match item {
                        Some(Ok(delivery)) => self.push(delivery),
                        _ => {
                            // Broken: the next `next` reopens it.
                            *stream = None;
                            self.forget_channel();
                            break;
                        }
                    }
                }
            }
            self.return_stale().await;
        }
    }

    /// Everything pushed and handed out on the broken channel is requeued by the broker: drop
    /// the buffer and disarm the deadlines, whose acks could not work any more.
    fn forget_channel(&self) {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.deadlines.drain_unsettled();
    }

    /// Hands back, unchanged, deliveries that waited in the buffer past the ack deadline.
    async fn return_stale(&self) {
        let stale: Vec<Pushed> = {
            let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            let mut stale = Vec::new();
            while buffer
                .front()
                .is_some_and(|p| p.arrived.elapsed() >= self.ack_deadline)
            {
                stale.extend(buffer.pop_front());
            }
            stale
        };
        for pushed in stale {
            let message = decode(&pushed.delivery);
            if let Err(err) = self.shared.hand_back(self, &message, None).await {
                tracing::warn!(queue = %self.queue, error = %err, "cannot hand back a prefetched message; the broker keeps it for this member");
                continue;
            }
            let _ = pushed.delivery.acker.ack(BasicAckOptions::default()).await;
        }
    }

    fn take(self: &Arc<Self>) -> Option<Delivery> {
        let pushed = self
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()?;
        let message = decode(&pushed.delivery);
        let held = Arc::new(Held {
            state: Arc::clone(self),
            settlement: Settlement::default(),
            acker: pushed.delivery.acker,
            message: message.clone(),
        });
        self.deadlines
            .watch_until(Instant::now() + self.ack_deadline, &held);
        Some(Delivery::new(message, Box::new(RabbitMqAcker(held))))
    }
}

/// A delivery handed out.
struct Held {
    state: Arc<MemberState>,
    /// Settled by its acker, its ack deadline or the loss of its channel, whichever comes first.
    settlement: Settlement,
    acker: lapin::Acker,
    message: Message,
}

impl Settles for Held {
    fn settlement(&self) -> &Settlement {
        &self.settlement
    }
}

impl Held {
    /// True for the first of the acker, the deadline and the loss of the channel.
    fn claim(&self) -> bool {
        self.state.deadlines.claim(self)
    }

    /// Publishes a copy with `attempt + 1`, then acks the original; nothing once the topic
    /// was removed (the message went with it).
    async fn redeliver(&self, delay: Option<Duration>) -> Result<(), Error> {
        if self.state.removal.is_removed() {
            return Ok(());
        }
        let mut copy = self.message.clone();
        copy.attempt = copy.attempt.saturating_add(1);
        self.state
            .shared
            .hand_back(&self.state, &copy, delay)
            .await?;
        self.settle_ack("acking a redelivered message").await
    }

    /// Acks the delivery on its channel. lapin can wait forever for a channel whose
    /// connection died unnoticed, so the ack is bounded by the publish timeout; the broker
    /// redelivers what a lost channel held.
    async fn settle_ack(&self, what: &str) -> Result<(), Error> {
        let limit = self.state.shared.options.bounds.publish_timeout;
        match tokio::time::timeout(limit, self.acker.ack(BasicAckOptions::default())).await {
            Ok(acked) => acked.map(|_| ()).map_err(|err| unavailable(what, err)),
            Err(_) => Err(Error::Unavailable(format!(
                "rabbitmq: {what} did not complete within {limit:?}"
            ))),
        }
    }
}

/// Settles one delivery of a [`RabbitMqQueue`].
struct RabbitMqAcker(Arc<Held>);

#[async_trait]
impl Acker for RabbitMqAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        if !self.0.claim() || self.0.state.removal.is_removed() {
            return Ok(());
        }
        self.0
            .settle_ack("acking (the message will be redelivered)")
            .await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error> {
        if !self.0.claim() {
            return Ok(());
        }
        self.0.redeliver(delay).await
    }

    fn abandon(self: Box<Self>) {
        if !self.0.claim() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(err) = self.0.redeliver(None).await {
                tracing::warn!(error = %err, "cannot hand back an abandoned rabbitmq delivery");
            }
        });
    }
}

/// A member of a group of a [`RabbitMqQueue`].
struct RabbitMqConsumer {
    state: Arc<MemberState>,
    pump: Option<JoinHandle<()>>,
    watcher: JoinHandle<()>,
}

#[async_trait]
impl Consumer for RabbitMqConsumer {
    async fn next(&mut self) -> Result<Delivery, Error> {
        let removal = self.state.removal.clone();
        removal.or_closed(self.next_delivery()).await
    }
}

impl RabbitMqConsumer {
    /// `next` until the topic is removed; cancel safe.
    async fn next_delivery(&mut self) -> Result<Delivery, Error> {
        loop {
            if self.state.removal.is_removed() {
                return Err(Error::Closed);
            }
            if let Some(delivery) = self.state.take() {
                return Ok(delivery);
            }
            let mut stream = self.state.stream.lock().await;
            if self
                .state
                .buffer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                self.state.pull(&mut stream).await;
            }
        }
    }
}

impl Drop for RabbitMqConsumer {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
        let state = Arc::clone(&self.state);
        let channel = self
            .state
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // What was handed out and not settled comes back from the broker, flagged
            // redelivered, once the channel closes; disarm its deadlines first.
            state.deadlines.drain_unsettled();
            if state.removal.is_removed() {
                // What it buffered went with the topic.
                state.forget_channel();
            }
            // What was pushed and never handed out goes back unchanged.
            let buffered: Vec<Pushed> = state
                .buffer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            for pushed in buffered {
                let message = decode(&pushed.delivery);
                if state.shared.hand_back(&state, &message, None).await.is_ok() {
                    let _ = pushed.delivery.acker.ack(BasicAckOptions::default()).await;
                }
            }
            if let Some(channel) = channel {
                let _ = channel.close(200, "consumer dropped".into()).await;
            }
        });
    }
}
