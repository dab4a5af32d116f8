//! The NATS JetStream backend (feature `nats`).
//!
//! Layout, for topic `t`, group `g` and prefix `p`:
//! - one stream `p` on subjects `p.>`, file storage, *interest* retention: a message is kept
//!   until every group that existed when it was published acked it. Topic `t` is subject
//!   `p.t`. `publish` waits for the stream's publish ack (JetStream's publisher confirm) and
//!   sets `Nats-Msg-Id` to the message id, so a publish retried after a lost ack is stored once.
//! - one durable pull consumer per group, filtered on `p.t`, delivering only what is published
//!   after its creation, with explicit acks. Its name is derived from `t` and `g` (with a hash).
//!   It stays when its last member leaves, keeping the group's messages, unless
//!   [`NatsOptions::group_expiry`] is set.
//!
//! A member pulls one message per `next` (nothing is prefetched for a member that is not
//! asking). The attempt number is JetStream's delivery count. `nack` is `NAK` (with the
//! delay: `nak_with_delay`). The ack deadline of each member is kept by the client: at the
//! deadline it sends `NAK`, and a late ack or nack of that delivery is not sent; the group's
//! server-side `AckWait` is set a little longer (twice the first member's deadline, at least
//! one second more), so that it only catches members whose process died; a member with a
//! longer deadline than `AckWait` sends "in progress" to keep its delivery. A consumer that is
//! dropped NAKs what it held.
//!
//! Payloads too large for one NATS message (the server's `max_payload`, 1 MiB by default) are
//! stored in the object store bucket `p-payloads`, kept for
//! [`NatsOptions::large_payload_ttl`], and the message carries a reference.
//!
//! [`MessageQueue::delete_topic`] deletes the durable consumers of the stream whose filter is
//! `p.t` (listed with the stream's consumers: the groups of every process) and purges subject
//! `p.t` from the stream, so the groups' pending and NAKed messages go with them. Large payloads
//! of the topic in the object store are left to expire after
//! [`NatsOptions::large_payload_ttl`]. The topic's members in this process end with
//! [`Error::Closed`](crate::Error::Closed); members in other processes find their consumer
//! gone, and their pulls fail (and are retried) until they are dropped.
//!
//! While the connection is down, the client buffers what is published: a `publish` that failed
//! with [`Error::Unavailable`] after its bound may still reach the stream once the connection is
//! back (at-least-once; a retried publish within two minutes is stored once, by its id).
//!
//! Order: JetStream keeps publish order within a subject; a single member receives a topic's
//! messages in order; a NAKed message is redelivered ahead of newer ones once due.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::{AckKind, Acker as NatsAcker};
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::address::NatsAuth;
pub use crate::config::NatsOptions;
use crate::deadline::{Deadlines, Settlement, Settles};
use crate::redact::Secrets;
use crate::removal::{Removal, Removals};
use crate::retry::{self, Reconnect};
use crate::{Acker, Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

/// JetStream's de-duplication id, which carries the message id.
const MSG_ID_HEADER: &str = "Nats-Msg-Id";
const HEADERS_HEADER: &str = "Deployd-Headers";
const PAYLOAD_REF_HEADER: &str = "Deployd-Payload-Ref";
/// Room left for headers and protocol overhead below the server's `max_payload`.
const HEADROOM: usize = 16 * 1024;
/// The longest wait of one pull request.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// A [`MessageQueue`] on NATS JetStream. See the [module docs](self).
///
/// Cloning is cheap and yields another handle on the same connection.
#[derive(Clone)]
pub struct NatsQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsQueue")
            .field("stream", &self.shared.stream_name)
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    options: NatsOptions,
    stream_name: String,
    payloads: tokio::sync::OnceCell<ObjectStore>,
    /// The topics this queue removed, for its members.
    removals: Removals,
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("nats: {what}: {err}"))
}

impl NatsQueue {
    /// Connects to a server of `options.url` (one URL, or a comma-separated list whose
    /// servers are tried in a random order, as NATS clients do) and creates the stream if
    /// needed; fails with [`Error::InvalidConfig`] for a
    /// malformed list before connecting, and with [`Error::Unavailable`] when no server
    /// answers within the connect timeout.
    pub async fn connect(options: NatsOptions) -> Result<Self, Error> {
        if options.stream_prefix.is_empty()
            || !options
                .stream_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidConfig(format!(
                "nats stream prefix `{}` must be letters, digits, `-` and `_`",
                options.stream_prefix
            )));
        }
        let secrets = Secrets::of_url(&options.url);
        let (servers, auth) = crate::address::nats_servers(&options.url)?;
        let servers = servers
            .into_iter()
            .map(server_address)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|problem| {
                let problem = secrets.scrub(&problem);
                crate::address::invalid("NATS server list", &options.url, problem)
            })?;
        let bounds = options.bounds.clone();
        let backoff = bounds.clone();
        let mut connect_options = async_nats::ConnectOptions::new()
            .connection_timeout(bounds.connect_timeout)
            .request_timeout(Some(bounds.publish_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| {
                let exponent = u32::try_from(attempts.min(16)).unwrap_or(16);
                backoff
                    .reconnect_min_delay
                    .saturating_mul(2u32.saturating_pow(exponent))
                    .min(backoff.reconnect_max_delay)
            });
        connect_options = match auth {
            NatsAuth::None => connect_options,
            NatsAuth::UserPassword(user, password) => {
                connect_options.user_and_password(user, password)
            }
            NatsAuth::Token(token) => connect_options.token(token),
        };
        let client = match tokio::time::timeout(
            bounds.connect_timeout,
            async_nats::connect_with_options(servers, connect_options),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(secrets.scrub_error(unavailable("connecting", err))),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "nats: no connection within {:?}",
                    bounds.connect_timeout
                )));
            }
        };
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(bounds.publish_timeout);
        let stream_name = options.stream_prefix.clone();
        let shared = Arc::new(Shared {
            client,
            jetstream,
            stream_name,
            options,
            payloads: tokio::sync::OnceCell::new(),
            removals: Removals::default(),
        });
        retry::bounded(
            &bounds,
            bounds.connect_timeout,
            "creating the stream",
            || shared.stream(),
        )
        .await
        .map_err(|err| secrets.scrub_error(err))?;
        Ok(Self { shared })
    }
}

impl Shared {
    async fn stream(&self) -> Result<stream::Stream, Error> {
        let prefix = &self.options.stream_prefix;
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream_name.clone(),
                subjects: vec![format!("{prefix}.>")],
                retention: stream::RetentionPolicy::Interest,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|err| unavailable("creating the stream", err))
    }

    fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.options.stream_prefix)
    }

    /// Deletes the consumers filtered on `topic`'s subject and purges the subject.
    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        let subject = self.subject(topic);
        let stream = self.stream().await?;
        let mut consumers = stream.consumers();
        let mut names = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|err| unavailable("listing consumers", err))?;
            let config = &info.config;
            if config.filter_subject == subject {
                names.push(info.name);
            }
        }
        for name in names {
            match stream.delete_consumer(&name).await {
                Ok(_) => {}
                Err(err) => match err.kind() {
                    // Deleted meanwhile, by another process removing the topic too.
                    stream::ConsumerErrorKind::JetStream(js)
                        if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND => {}
                    _ => return Err(unavailable("deleting a consumer", err)),
                },
            }
        }
        stream
            .purge()
            .filter(subject)
            .await
            .map_err(|err| unavailable("purging a topic", err))?;
        Ok(())
    }

    async fn payloads(&self) -> Result<&ObjectStore, Error> {
        self.payloads
            .get_or_try_init(|| async {
                let bucket = format!("{}-payloads", self.options.stream_prefix);
                match self.jetstream.get_object_store(&bucket).await {
                    Ok(store) => Ok(store),
                    Err(_) => self
                        .jetstream
                        .create_object_store(object_store::Config {
                            bucket,
                            max_age: self.options.large_payload_ttl,
                            ..Default::default()
                        })
                        .await
                        .map_err(|err| unavailable("creating the payload bucket", err)),
                }
            })
            .await
    }

    /// The largest payload sent inline.
    fn inline_limit(&self) -> usize {
        let max_payload = self.client.max_payload();
        max_payload.saturating_sub(HEADROOM).max(HEADROOM)
    }
}

/// The address of one entry of a server list, without its credentials: the client
/// authenticates with those of its options, and its own logs print addresses in full.
fn server_address(entry: &str) -> Result<ServerAddr, String> {
    let message = |err: std::io::Error| err.to_string();
    let mut url = entry.parse::<ServerAddr>().map_err(message)?.into_inner();
    // Neither fails on a URL with a host, which every parsed server address has.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    ServerAddr::from_url(url).map_err(message)
}

/// A durable consumer name for group `group` of `topic`: readable, unique by a hash.
fn consumer_name(topic: &str, group: &str) -> String {
    let hash = format!("{topic}\0{group}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    let readable: String = format!("{topic}-{group}")
        .chars()
        .map(|c| if c == '.' { '_' } else { c })
        .take(100)
        .collect();
    format!("{readable}-{hash:016x}")
}

fn encode_headers(message: &Message, payload_ref: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    // The message id travels once, as JetStream's de-duplication id.
    headers.insert(MSG_ID_HEADER, message.id.as_str());
    if !message.headers.is_empty() {
        let encoded: Vec<String> = message
            .headers
            .iter()
            .map(|(name, value)| {
                format!(
                    "{}={}",
                    crate::address::percent_encode(name),
                    crate::address::percent_encode(value)
                )
            })
            .collect();
        headers.insert(HEADERS_HEADER, encoded.join("&").as_str());
    }
    if let Some(reference) = payload_ref {
        headers.insert(PAYLOAD_REF_HEADER, reference);
    }
    headers
}

#[async_trait]
impl MessageQueue for NatsQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        let subject = self.shared.subject(topic);
        let bounds = &self.shared.options.bounds;
        let (headers, payload) = if message.payload.len() > self.shared.inline_limit() {
            let reference = message.id.clone();
            let payloads =
                retry::bounded(bounds, bounds.publish_timeout, "storing a payload", || {
                    self.shared.payloads()
                })
                .await?;
            let mut reader: &[u8] = &message.payload;
            tokio::time::timeout(
                bounds.publish_timeout,
                payloads.put(reference.as_str(), &mut reader),
            )
            .await
            .map_err(|_| Error::Unavailable("nats: storing a large payload timed out".into()))?
            .map_err(|err| unavailable("storing a large payload", err))?;
            (encode_headers(&message, Some(&reference)), Bytes::new())
        } else {
            (encode_headers(&message, None), message.payload.clone())
        };
        retry::bounded(bounds, bounds.publish_timeout, "publishing to nats", || {
            let headers = headers.clone();
            let payload = payload.clone();
            let subject = subject.clone();
            async move {
                let ack = self
                    .shared
                    .jetstream
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|err| unavailable("publishing", err))?;
                ack.await.map_err(|err| unavailable("publishing", err))?;
                Ok(())
            }
        })
        .await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Consumer>, Error> {
        crate::validate_name("topic", topic)?;
        crate::validate_name("group", group)?;
        let name = consumer_name(topic, group);
        let removal = self.shared.removals.watch(topic);
        let deadline = options.ack_deadline;
        let server_ack_wait = (deadline * 2).max(deadline + Duration::from_secs(1));
        let group_expiry = self.shared.options.group_expiry;
        let bounds = &self.shared.options.bounds;
        let consumer: PullConsumer = retry::bounded(
            bounds,
            bounds.publish_timeout,
            "creating a consumer",
            || {
                let name = name.clone();
                let subject = self.shared.subject(topic);
                async move {
                    let stream = self.shared.stream().await?;
                    stream
                        .get_or_create_consumer(
                            &name,
                            pull::Config {
                                durable_name: Some(name.clone()),
                                filter_subject: subject,
                                deliver_policy: DeliverPolicy::New,
                                ack_policy: AckPolicy::Explicit,
                                ack_wait: server_ack_wait,
                                max_deliver: -1,
                                inactive_threshold: group_expiry.unwrap_or_default(),
                                ..Default::default()
                            },
                        )
                        .await
                        .map_err(|err| unavailable("creating a consumer", err))
                }
            },
        )
        .await?;
        let ack_wait = consumer.cached_info().config.ack_wait;
        let member = Arc::new(Member {
            shared: Arc::clone(&self.shared),
            consumer,
            ack_deadline: deadline,
            ack_wait,
            deadlines: Arc::new(Deadlines::new()),
            removal,
        });
        let watcher = tokio::spawn(
            Arc::clone(&member.deadlines).watch(|held: Arc<Held>| held.deadline_reached()),
        );
        Ok(Box::new(NatsConsumer {
            member,
            fetch: None,
            watcher,
        }))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        self.shared.removals.remove(topic);
        let bounds = &self.shared.options.bounds;
        retry::bounded(
            bounds,
            bounds.publish_timeout,
            "deleting a topic on nats",
            || self.shared.delete_topic(topic),
        )
        .await
    }
}

/// One member of a group.
struct Member {
    shared: Arc<Shared>,
    consumer: PullConsumer,
    ack_deadline: Duration,
    /// The group's server-side ack wait.
    ack_wait: Duration,
    /// What this member handed out and has not settled.
    deadlines: Arc<Deadlines<Held>>,
    /// Fires when this queue removes the member's topic.
    removal: Removal,
}

type Fetched = Result<Option<jetstream::Message>, Error>;

impl Member {
    /// Pulls at most one message, waiting up to [`PULL_EXPIRES`].
    async fn fetch_one(self: Arc<Self>) -> Fetched {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|err| unavailable("pulling", err))?;
        match batch.next().await {
            Some(Ok(message)) => Ok(Some(message)),
            Some(Err(err)) => Err(unavailable("pulling", err)),
            None => Ok(None),
        }
    }

    async fn hand_out(self: &Arc<Self>, message: jetstream::Message) -> Result<Delivery, Error> {
        let attempt = message
            .info()
            .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1);
        let (message, acker) = message.split();
        let decoded = match self.decode(message, attempt).await {
            Ok(decoded) => decoded,
            Err(err) => {
                let _ = acker
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return Err(err);
            }
        };
        let now = Instant::now();
        let deadline = now + self.ack_deadline;
        let held = Arc::new(Held {
            member: Arc::clone(self),
            settlement: Settlement::default(),
            deadline,
            acker,
        });
        held.schedule(now);
        Ok(Delivery::new(decoded, Box::new(NatsDeliveryAcker(held))))
    }

    async fn decode(&self, message: async_nats::Message, attempt: u32) -> Result<Message, Error> {
        let headers = message.headers.unwrap_or_default();
        let id = headers
            .get(MSG_ID_HEADER)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let mut user_headers = BTreeMap::new();
        if let Some(encoded) = headers.get(HEADERS_HEADER) {
            for pair in encoded.as_str().split('&').filter(|p| !p.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                user_headers.insert(
                    crate::address::percent_decode(name),
                    crate::address::percent_decode(value),
                );
            }
        }
        let payload = match headers.get(PAYLOAD_REF_HEADER) {
            None => message.payload,
            Some(reference) => {
                let bounds = &self.shared.options.bounds;
                let payloads = self.shared.payloads().await?;
                let read = async {
                    let mut object = payloads
                        .get(reference.as_str())
                        .await
                        .map_err(|err| unavailable("reading a large payload", err))?;
                    let mut bytes = Vec::new();
                    object
                        .read_to_end(&mut bytes)
                        .await
                        .map_err(|err| unavailable("reading a large payload", err))?;
                    Ok::<_, Error>(Bytes::from(bytes))
                };
                tokio::time::timeout(bounds.publish_timeout, read)
                    .await
                    .map_err(|_| {
                        Error::Unavailable("nats: reading a large payload timed out".into())
                    })??
            }
        };
        Ok(Message {
            id,
            attempt,
            headers: user_headers,
            payload,
        })
    }
}

/// A delivery handed out.
struct Held {
    member: Arc<Member>,
    settlement: Settlement,
    /// The member's ack deadline for it.
    deadline: Instant,
    acker: NatsAcker,
}

impl Settles for Held {
    fn settlement(&self) -> &Settlement {
        &self.settlement
    }
}

impl Held {
    /// Whether the topic was removed, and the delivery with it.
    fn removed(&self) -> bool {
        self.member.removal.is_removed()
    }

    /// Watches the delivery until its deadline, or until the next "in progress" beat when the
    /// server's ack wait is shorter.
    fn schedule(self: &Arc<Self>, now: Instant) {
        let beat = (self.member.ack_wait / 2).max(Duration::from_millis(100));
        let at = self.deadline.min(now + beat);
        self.member.deadlines.watch_until(at, self);
    }

    /// True for the first of the acker, the deadline and the consumer's drop.
    fn claim(&self) -> bool {
        self.member.deadlines.claim(self)
    }

    async fn deadline_reached(self: Arc<Self>) {
        let now = Instant::now();
        if now < self.deadline {
            if !self.settlement.is_settled() {
                let _ = self.acker.ack_with(AckKind::Progress).await;
                self.schedule(now);
            }
            return;
        }
        if self.claim() {
            tracing::debug!("ack deadline passed; redelivering");
            if let Err(err) = self.acker.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(error = %err, "cannot hand back a message past its ack deadline");
            }
        }
    }
}

/// Settles one delivery of a [`NatsQueue`].
struct NatsDeliveryAcker(Arc<Held>);

#[async_trait]
impl Acker for NatsDeliveryAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        if !self.0.claim() || self.0.removed() {
            return Ok(());
        }
        self.0
            .acker
            .ack()
            .await
            .map_err(|err| unavailable("acking (the message will be redelivered)", err))
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error> {
        if !self.0.claim() || self.0.removed() {
            return Ok(());
        }
        let delay = delay.filter(|d| !d.is_zero());
        self.0
            .acker
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(|err| unavailable("nacking (the message will be redelivered)", err))
    }

    fn abandon(self: Box<Self>) {
        if !self.0.claim() || self.0.removed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = self.0.acker.ack_with(AckKind::Nak(None)).await;
        });
    }
}

/// A member of a group of a [`NatsQueue`].
struct NatsConsumer {
    member: Arc<Member>,
    /// The pull in progress; it outlives a cancelled `next`, whose result the next call takes.
    fetch: Option<Pin<Box<dyn Future<Output = Fetched> + Send>>>,
    watcher: JoinHandle<()>,
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn next(&mut self) -> Result<Delivery, Error> {
        let removal = self.member.removal.clone();
        removal.or_closed(self.next_message()).await
    }
}

impl NatsConsumer {
    /// `next` until the topic is removed; cancel safe.
    async fn next_message(&mut self) -> Result<Delivery, Error> {
        let mut reconnect = Reconnect::new(&self.member.shared.options.bounds);
        loop {
            let fetch = self
                .fetch
                .get_or_insert_with(|| Box::pin(Arc::clone(&self.member).fetch_one()));
            let result = fetch.await;
            self.fetch = None;
            let result = match result {
                Ok(Some(message)) => self.member.hand_out(message).await.map(Some),
                other => other.map(|_| None),
            };
            match result {
                Ok(Some(delivery)) => return Ok(delivery),
                Ok(None) => reconnect.succeeded(),
                Err(Error::Unavailable(message)) => reconnect.pause("nats pull", &message).await,
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        self.watcher.abort();
        let fetch = self.fetch.take();
        let member = Arc::clone(&self.member);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if member.removal.is_removed() {
                // What it held went with the topic.
                member.deadlines.drain_unsettled();
                return;
            }
            for held in member.deadlines.drain_unsettled() {
                let _ = held.acker.ack_with(AckKind::Nak(None)).await;
            }
            // A pull in progress may still bring a message in this member's name.
            if let Some(fetch) = fetch
                && let Ok(Some(message)) = fetch.await
            {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        });
    }
}
