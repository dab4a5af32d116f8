//! The Amazon SQS backend (feature `sqs`).
//!
//! SQS has queues, not topics, so the backend adds a thin fan-out layer: group `g` of topic `t`
//! is the standard queue `{prefix}-{hash(t)}-{hash(g)}-{readable t and g}` (SQS names are at
//! most 80 characters of `[A-Za-z0-9_-]`), created by `subscribe`. `publish` lists the queues
//! whose name starts with `{prefix}-{hash(t)}-` (`ListQueues`, cached for
//! [`GROUP_CACHE_TTL`]; a queue's own subscriptions are seen at once) and sends the message to
//! each, returning once SQS accepted every copy. A group created in another process is
//! therefore seen by a publisher within [`GROUP_CACHE_TTL`].
//!
//! A member receives one message per `next` (`ReceiveMessage`, long polling, at most one
//! message), so nothing is held for a member that is not asking. The visibility timeout of the
//! receive is the member's ack deadline rounded up to whole seconds, plus one; the exact
//! deadline is kept by the client, which makes the message visible again at the deadline
//! (`ChangeMessageVisibility` to 0) and does not send a late ack or nack of it. The server's
//! longer timeout only catches members whose process died. An ack is `DeleteMessage` (a
//! receipt handle SQS no longer knows, after a retried delete or past the visibility timeout,
//! ends the ack without an error: the message is gone or comes back by itself); a nack
//! is `ChangeMessageVisibility` to the delay (rounded up to whole seconds; 0 for none). The
//! attempt number is SQS's `ApproximateReceiveCount`. A consumer that is dropped makes what it
//! held visible again.
//!
//! Messages: the body is a fixed marker; the id, the headers (percent-encoded in one
//! attribute, as SQS allows 10 attributes) and the payload (a binary attribute) are message
//! attributes. Queues are created with the largest message size SQS allows (1 MiB) and a
//! retention of 14 days. AWS counts attributes in that limit, so a payload of about 1 MiB does
//! not fit on AWS (no S3 claim check is implemented); moto does not count them.
//!
//! Duplicates: standard queues may deliver a message twice, and keep both copies of a publish
//! retried after its answer was lost. Within one process a copy of a message that a member of
//! the same group holds is put back for two seconds, and a copy of one acked lately (the last
//! 65,536 per process) is deleted; across processes the copy is delivered (at-least-once).
//!
//! [`MessageQueue::delete_topic`] deletes every queue whose name starts with
//! `{prefix}-{hash(t)}-` (`ListQueues` with that prefix: the groups of every process) with
//! what they hold, in flight and delayed messages too, and drops the topic's cached list of
//! groups. The topic's members in this process end with [`Error::Closed`](crate::Error::Closed);
//! members in other processes fail to receive from the deleted queue (and retry), and receive
//! again once their group's queue is created anew. AWS lets a queue be created again under its
//! name only 60 seconds after its deletion: a `subscribe` to a group of the topic fails with
//! [`Error::Unavailable`](crate::Error::Unavailable) until then (moto has no such wait).
//!
//! Order: standard queues do not keep order (SQS delivers in about publish order).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use bytes::Bytes;
use tokio::task::JoinHandle;

pub use crate::config::SqsOptions;
use crate::deadline::{Deadlines, Settlement, Settles};
use crate::redact::Secrets;
use crate::removal::{Removal, Removals};
use crate::retry::{self, Reconnect};
use crate::{Acker, Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

/// How long `publish` trusts its list of a topic's groups.
pub const GROUP_CACHE_TTL: Duration = Duration::from_secs(2);

const BODY: &str = "deployd";
const ID_ATTRIBUTE: &str = "deployd-id";
const HEADERS_ATTRIBUTE: &str = "deployd-headers";
const PAYLOAD_ATTRIBUTE: &str = "deployd-payload";
/// The longest wait of one `ReceiveMessage`.
const LONG_POLL_SECONDS: i32 = 1;
const MAX_MESSAGE_SIZE: &str = "1048576";
const RETENTION_SECONDS: &str = "1209600";

/// A [`MessageQueue`] on Amazon SQS. See the [module docs](self).
///
/// Cloning is cheap and yields another handle on the same client.
#[derive(Clone)]
pub struct SqsQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsQueue")
            .field("region", &self.shared.options.region)
            .field("queue_prefix", &self.shared.options.queue_prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: Client,
    options: SqsOptions,
    /// Queue URLs of each topic's groups, with when they were listed.
    groups: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    /// The messages this process holds or acked lately, by group queue and message id.
    recent: Mutex<Recent>,
    /// The topics this queue removed, for its members.
    removals: Removals,
}

/// How long a copy of a held message stays invisible before it is looked at again.
const COPY_RETRY_SECONDS: i32 = 2;

/// How many acked messages [`Recent`] remembers.
const RECENT_ACKED: usize = 65_536;

/// A group queue's URL and a message id.
type CopyKey = (String, String);

/// Standard queues may deliver one message twice, and keep both copies of a publish that was
/// retried after its answer was lost. Within a process, a copy of a message that a member of
/// the same group acked lately is deleted instead of handed out, and a copy of one a member
/// holds is put back for [`COPY_RETRY_SECONDS`] (it is deleted then if the holder acked, handed
/// out if it let go). Across processes such a copy is delivered (at-least-once).
#[derive(Default)]
struct Recent {
    held: HashSet<CopyKey>,
    acked: HashSet<CopyKey>,
    order: VecDeque<CopyKey>,
}

/// What to do with a message received.
enum Copy {
    /// Hand it out (it is held from now on).
    First,
    /// A member holds another copy: put this one back for a while.
    Held,
    /// A member acked another copy: delete this one.
    Acked,
}

impl Recent {
    fn take(&mut self, key: &CopyKey) -> Copy {
        if self.acked.contains(key) {
            Copy::Acked
        } else if self.held.contains(key) {
            Copy::Held
        } else {
            self.held.insert(key.clone());
            Copy::First
        }
    }

    /// The holder let the message go without deleting it: a redelivery is handed out.
    fn release(&mut self, key: &CopyKey) {
        self.held.remove(key);
    }

    fn acked(&mut self, key: &CopyKey) {
        self.held.remove(key);
        if self.acked.insert(key.clone()) {
            self.order.push_back(key.clone());
            if self.order.len() > RECENT_ACKED
                && let Some(oldest) = self.order.pop_front()
            {
                self.acked.remove(&oldest);
            }
        }
    }
}

fn unavailable(what: &str, err: impl std::error::Error) -> Error {
    // The SDK's Display says only "service error"; the source chain says what.
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::Unavailable(format!("sqs: {what}: {message}"))
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn readable(text: &str) -> String {
    text.chars()
        .map(|c| if c == '.' { '_' } else { c })
        .collect()
}

impl SqsQueue {
    /// Builds the client and checks that SQS answers; fails with [`Error::Unavailable`] when it
    /// does not within the connect timeout.
    pub async fn connect(options: SqsOptions) -> Result<Self, Error> {
        let mut secrets = Secrets::of_sqs(&options);
        for variable in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
            if let Ok(secret) = std::env::var(variable) {
                secrets.add(&secret);
            }
        }
        Self::connect_checked(options)
            .await
            .map_err(|err| secrets.scrub_error(err))
    }

    async fn connect_checked(options: SqsOptions) -> Result<Self, Error> {
        options.validate()?;
        let prefix_ok = !options.queue_prefix.is_empty()
            && options.queue_prefix.len() <= 20
            && options
                .queue_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !prefix_ok {
            return Err(Error::InvalidConfig(format!(
                "sqs queue prefix `{}` must be 1 to 20 letters, digits, `-` and `_`",
                options.queue_prefix
            )));
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let access_key = options
            .access_key_id
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret_key = options
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let session_token = options
            .session_token
            .clone()
            .or_else(|| env("AWS_SESSION_TOKEN"));
        let (Some(access_key), Some(secret_key)) = (access_key, secret_key) else {
            return Err(Error::InvalidConfig(
                "sqs needs credentials: set access_key_id and secret_access_key, or \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    .into(),
            ));
        };
        let bounds = options.bounds.clone();
        let plain_http = options
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let http_client = if plain_http {
            aws_smithy_http_client::Builder::new().build_http()
        } else {
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https()
        };
        let mut config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(options.region.clone()))
            .credentials_provider(Credentials::new(
                access_key,
                secret_key,
                session_token,
                None,
                "deployd",
            ))
            .http_client(http_client)
            .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(bounds.connect_timeout)
                    .operation_attempt_timeout(
                        bounds.publish_timeout + Duration::from_secs(LONG_POLL_SECONDS as u64),
                    )
                    .build(),
            );
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let client = Client::from_conf(config.build());
        let shared = Arc::new(Shared {
            client,
            options,
            groups: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
            removals: Removals::default(),
        });
        retry::bounded(&bounds, bounds.connect_timeout, "reaching sqs", || async {
            shared
                .client
                .list_queues()
                .queue_name_prefix(&shared.options.queue_prefix)
                .max_results(1)
                .send()
                .await
                .map_err(|err| unavailable("listing queues", err))?;
            Ok(())
        })
        .await?;
        Ok(Self { shared })
    }
}

impl Shared {
    fn topic_prefix(&self, topic: &str) -> String {
        format!("{}-{:016x}-", self.options.queue_prefix, fnv(topic))
    }

    fn queue_name(&self, topic: &str, group: &str) -> String {
        let mut name = format!("{}{:016x}-", self.topic_prefix(topic), fnv(group));
        let room = 80usize.saturating_sub(name.len());
        name.extend(readable(&format!("{topic}-{group}")).chars().take(room));
        name
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue URLs of `topic`'s groups.
    async fn groups(&self, topic: &str) -> Result<Vec<String>, Error> {
        if let Some((listed, urls)) = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            && listed.elapsed() < GROUP_CACHE_TTL
        {
            return Ok(urls.clone());
        }
        let urls = self.list_groups(topic).await?;
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), (Instant::now(), urls.clone()));
        Ok(urls)
    }

    /// The queue URLs of `topic`'s groups, as SQS lists them now.
    async fn list_groups(&self, topic: &str) -> Result<Vec<String>, Error> {
        let prefix = self.topic_prefix(topic);
        let mut urls = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_queues()
                .queue_name_prefix(&prefix)
                .max_results(1000)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|err| unavailable("listing a topic's queues", err))?;
            urls.extend(page.queue_urls().iter().cloned());
            match page.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(urls)
    }

    /// Deletes the queue at `url`; one that is gone already is not an error.
    async fn delete_queue(&self, url: &str) -> Result<(), Error> {
        match self.client.delete_queue().queue_url(url).send().await {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_queue_does_not_exist()) =>
            {
                Ok(())
            }
            Err(err) => Err(unavailable("deleting a queue", err)),
        }
    }

    fn remember_group(&self, topic: &str, url: &str) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, urls)) = groups.get_mut(topic)
            && !urls.iter().any(|u| u == url)
        {
            urls.push(url.to_owned());
        }
    }

    async fn send(&self, url: &str, message: &Message) -> Result<(), Error> {
        let attribute = |data_type: &str| MessageAttributeValue::builder().data_type(data_type);
        let build = |builder: aws_sdk_sqs::types::builders::MessageAttributeValueBuilder| {
            builder
                .build()
                .map_err(|err| Error::Backend(format!("sqs: {err}")))
        };
        let mut request = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(BODY)
            .message_attributes(
                ID_ATTRIBUTE,
                build(attribute("String").string_value(&message.id))?,
            );
        if !message.payload.is_empty() {
            request = request.message_attributes(
                PAYLOAD_ATTRIBUTE,
                build(attribute("Binary").binary_value(Blob::new(message.payload.to_vec())))?,
            );
        }
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
            request = request.message_attributes(
                HEADERS_ATTRIBUTE,
                build(attribute("String").string_value(encoded.join("&")))?,
            );
        }
        request
            .send()
            .await
            .map_err(|err| unavailable("sending a message", err))?;
        Ok(())
    }

    async fn set_visibility(&self, url: &str, receipt: &str, seconds: i32) -> Result<(), Error> {
        self.client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|err| unavailable("changing a message's visibility", err))?;
        Ok(())
    }
}

fn whole_seconds(duration: Duration) -> i32 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    // SQS's maximum visibility timeout is 12 hours.
    i32::try_from(seconds.min(43_200)).unwrap_or(43_200)
}

fn decode(message: &aws_sdk_sqs::types::Message) -> Message {
    let attributes = message.message_attributes();
    let string = |name: &str| {
        attributes
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
    };
    let id = string(ID_ATTRIBUTE).unwrap_or_default().to_owned();
    let mut headers = BTreeMap::new();
    if let Some(encoded) = string(HEADERS_ATTRIBUTE) {
        for pair in encoded.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            headers.insert(
                crate::address::percent_decode(name),
                crate::address::percent_decode(value),
            );
        }
    }
    let payload = attributes
        .and_then(|a| a.get(PAYLOAD_ATTRIBUTE))
        .and_then(|v| v.binary_value())
        .map(|blob| Bytes::copy_from_slice(blob.as_ref()))
        .unwrap_or_default();
    let attempt = message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|count| count.parse().ok())
        .unwrap_or(1u32)
        .max(1);
    Message {
        id,
        attempt,
        headers,
        payload,
    }
}

#[async_trait]
impl MessageQueue for SqsQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        let bounds = &self.shared.options.bounds;
        retry::bounded(
            bounds,
            bounds.publish_timeout,
            "publishing to sqs",
            || async {
                let urls = self.shared.groups(topic).await?;
                let sends = urls.iter().map(|url| self.shared.send(url, &message));
                futures::future::try_join_all(sends).await?;
                Ok(())
            },
        )
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
        let name = self.shared.queue_name(topic, group);
        let removal = self.shared.removals.watch(topic);
        let bounds = &self.shared.options.bounds;
        let url = retry::bounded(
            bounds,
            bounds.publish_timeout,
            "creating a queue",
            || async {
                let created = self
                    .shared
                    .client
                    .create_queue()
                    .queue_name(&name)
                    .attributes(QueueAttributeName::MaximumMessageSize, MAX_MESSAGE_SIZE)
                    .attributes(
                        QueueAttributeName::MessageRetentionPeriod,
                        RETENTION_SECONDS,
                    )
                    .send()
                    .await
                    .map_err(|err| unavailable("creating a queue", err))?;
                created
                    .queue_url()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::Backend("sqs: CreateQueue returned no URL".into()))
            },
        )
        .await?;
        self.shared.remember_group(topic, &url);
        let member = Arc::new(Member {
            shared: Arc::clone(&self.shared),
            url,
            ack_deadline: options.ack_deadline,
            deadlines: Arc::new(Deadlines::new()),
            removal,
        });
        let watcher = tokio::spawn(Arc::clone(&member.deadlines).watch(
            |held: Arc<Held>| async move {
                if held.claim() {
                    tracing::debug!("ack deadline passed; redelivering");
                    if let Err(err) = held.make_visible(0).await {
                        tracing::warn!(error = %err, "cannot hand back a message past its ack deadline");
                    }
                }
            },
        ));
        Ok(Box::new(SqsConsumer {
            member,
            receive: None,
            watcher,
        }))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        self.shared.removals.remove(topic);
        let bounds = &self.shared.options.bounds;
        let urls = retry::bounded(
            bounds,
            bounds.publish_timeout,
            "deleting a topic on sqs",
            || self.shared.list_groups(topic),
        )
        .await?;
        for url in &urls {
            retry::bounded(
                bounds,
                bounds.publish_timeout,
                "deleting a topic on sqs",
                || self.shared.delete_queue(url),
            )
            .await?;
        }
        self.shared
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        Ok(())
    }
}

/// One member of a group.
struct Member {
    shared: Arc<Shared>,
    url: String,
    ack_deadline: Duration,
    /// What this member handed out and has not settled.
    deadlines: Arc<Deadlines<Held>>,
    /// Fires when this queue removes the member's topic.
    removal: Removal,
}

type Received = Result<Option<aws_sdk_sqs::types::Message>, Error>;

impl Member {
    async fn receive_one(self: Arc<Self>) -> Received {
        let visibility = whole_seconds(self.ack_deadline).saturating_add(1);
        let output = self
            .shared
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(1)
            .wait_time_seconds(LONG_POLL_SECONDS)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|err| unavailable("receiving", err))?;
        Ok(output.messages.and_then(|mut messages| messages.pop()))
    }

    fn hand_out(self: &Arc<Self>, message: aws_sdk_sqs::types::Message) -> Option<Delivery> {
        let receipt = message.receipt_handle()?.to_owned();
        let decoded = decode(&message);
        let key = (!decoded.id.is_empty()).then(|| (self.url.clone(), decoded.id.clone()));
        let copy = key
            .as_ref()
            .map_or(Copy::First, |key| self.shared.recent().take(key));
        if !matches!(copy, Copy::First) {
            tracing::debug!(id = %decoded.id, "sqs: another copy of a message held or acked here");
            let member = Arc::clone(self);
            tokio::spawn(async move {
                let shared = &member.shared;
                if matches!(copy, Copy::Acked) {
                    let _ = shared
                        .client
                        .delete_message()
                        .queue_url(&member.url)
                        .receipt_handle(receipt)
                        .send()
                        .await;
                } else {
                    let _ = shared
                        .set_visibility(&member.url, &receipt, COPY_RETRY_SECONDS)
                        .await;
                }
            });
            return None;
        }
        let held = Arc::new(Held {
            member: Arc::clone(self),
            settlement: Settlement::default(),
            receipt,
            key,
        });
        let at = tokio::time::Instant::now() + self.ack_deadline;
        self.deadlines.watch_until(at, &held);
        Some(Delivery::new(decoded, Box::new(SqsAcker(held))))
    }
}

/// A delivery handed out.
struct Held {
    member: Arc<Member>,
    settlement: Settlement,
    receipt: String,
    /// Its entry in [`Shared::recent`], for a message with an id.
    key: Option<CopyKey>,
}

impl Settles for Held {
    fn settlement(&self) -> &Settlement {
        &self.settlement
    }
}

impl Held {
    /// True for the first of the acker, the deadline and the consumer's drop, unless the
    /// topic was removed with the message.
    fn claim(&self) -> bool {
        if !self.member.deadlines.claim(self) {
            return false;
        }
        if self.member.removal.is_removed() {
            self.settled(false);
            return false;
        }
        true
    }

    /// Records how the delivery ended: deleted (`acked`), or let go to come back.
    fn settled(&self, acked: bool) {
        if let Some(key) = &self.key {
            let mut recent = self.member.shared.recent();
            if acked {
                recent.acked(key);
            } else {
                recent.release(key);
            }
        }
    }

    async fn make_visible(&self, seconds: i32) -> Result<(), Error> {
        self.settled(false);
        let bounds = &self.member.shared.options.bounds;
        retry::bounded(bounds, bounds.publish_timeout, "nacking on sqs", || {
            self.member
                .shared
                .set_visibility(&self.member.url, &self.receipt, seconds)
        })
        .await
    }
}

/// Settles one delivery of an [`SqsQueue`].
struct SqsAcker(Arc<Held>);

#[async_trait]
impl Acker for SqsAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        if !self.0.claim() {
            return Ok(());
        }
        let member = &self.0.member;
        let bounds = &member.shared.options.bounds;
        let acked = retry::bounded(bounds, bounds.publish_timeout, "acking on sqs", || async {
            let deleted = member
                .shared
                .client
                .delete_message()
                .queue_url(&member.url)
                .receipt_handle(&self.0.receipt)
                .send()
                .await;
            match deleted {
                Ok(_) => Ok(()),
                // A retry after a delete whose answer was lost, or an ack after the visibility
                // timeout (the message comes back anyway): retrying cannot help.
                Err(err)
                    if err
                        .as_service_error()
                        .is_some_and(|e| e.is_receipt_handle_is_invalid()) =>
                {
                    tracing::debug!("sqs: the receipt handle is no longer valid; ack skipped");
                    Ok(())
                }
                Err(err) => Err(unavailable("deleting a message", err)),
            }
        })
        .await;
        self.0.settled(acked.is_ok());
        acked
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error> {
        if !self.0.claim() {
            return Ok(());
        }
        self.0.make_visible(delay.map_or(0, whole_seconds)).await
    }

    fn abandon(self: Box<Self>) {
        if !self.0.claim() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(err) = self.0.make_visible(0).await {
                tracing::warn!(error = %err, "cannot hand back an abandoned sqs delivery");
            }
        });
    }
}

/// A member of a group of an [`SqsQueue`].
struct SqsConsumer {
    member: Arc<Member>,
    /// The receive in progress; it outlives a cancelled `next`, whose result the next call
    /// takes.
    receive: Option<Pin<Box<dyn Future<Output = Received> + Send>>>,
    watcher: JoinHandle<()>,
}

#[async_trait]
impl Consumer for SqsConsumer {
    async fn next(&mut self) -> Result<Delivery, Error> {
        let removal = self.member.removal.clone();
        removal.or_closed(self.next_message()).await
    }
}

impl SqsConsumer {
    /// `next` until the topic is removed; cancel safe.
    async fn next_message(&mut self) -> Result<Delivery, Error> {
        let mut reconnect = Reconnect::new(&self.member.shared.options.bounds);
        loop {
            let receive = self
                .receive
                .get_or_insert_with(|| Box::pin(Arc::clone(&self.member).receive_one()));
            let result = receive.await;
            self.receive = None;
            match result {
                Ok(Some(message)) => {
                    if let Some(delivery) = self.member.hand_out(message) {
                        return Ok(delivery);
                    }
                }
                Ok(None) => reconnect.succeeded(),
                Err(Error::Unavailable(message)) => {
                    reconnect.pause("sqs receive", &message).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for SqsConsumer {
    fn drop(&mut self) {
        self.watcher.abort();
        let receive = self.receive.take();
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
                let _ = held.make_visible(0).await;
            }
            // A receive in progress may still take a message in this member's name.
            if let Some(receive) = receive
                && let Ok(Some(message)) = receive.await
                && let Some(receipt) = message.receipt_handle()
            {
                let _ = member.shared.set_visibility(&member.url, receipt, 0).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> CopyKey {
        ("https://sqs/queue".to_owned(), id.to_owned())
    }

    #[test]
    fn a_second_copy_waits_while_the_first_is_held_and_is_deleted_once_it_is_acked() {
        let mut recent = Recent::default();
        assert!(matches!(recent.take(&key("a")), Copy::First));
        assert!(matches!(recent.take(&key("a")), Copy::Held));
        assert!(matches!(recent.take(&key("b")), Copy::First), "per message");
        recent.acked(&key("a"));
        assert!(matches!(recent.take(&key("a")), Copy::Acked));
        // A message let go (nack, deadline, drop) is handed out again when it comes back.
        recent.release(&key("b"));
        assert!(matches!(recent.take(&key("b")), Copy::First));
    }

    #[test]
    fn acked_ids_are_forgotten_oldest_first_past_the_bound() {
        let mut recent = Recent::default();
        for i in 0..=RECENT_ACKED {
            recent.acked(&key(&i.to_string()));
        }
        assert!(
            matches!(recent.take(&key("0")), Copy::First),
            "the oldest is forgotten"
        );
        assert!(matches!(recent.take(&key("1")), Copy::Acked));
        assert_eq!(recent.acked.len(), RECENT_ACKED);
    }
}
