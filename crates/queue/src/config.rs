//! Choosing and configuring a backend: [`QueueConfig`], the options of every backend, and
//! [`connect`].
//!
//! These types are plain data and exist whatever features are enabled, so that a caller (the
//! manager) can map its own configuration onto them; [`connect`] fails with
//! [`Error::Unsupported`] for a backend whose feature is off.

use std::sync::Arc;
use std::time::Duration;

use crate::{Error, MessageQueue};

/// How long a backend waits for a broker, and how it retries a lost connection.
///
/// Every broker-backed queue retries a lost connection with exponential backoff (with jitter)
/// between `reconnect_min_delay` and `reconnect_max_delay`, transparently to its callers.
/// `publish` gives up after `publish_timeout` with [`Error::Unavailable`]: it never hangs.
/// A consumer waiting in [`Consumer::next`](crate::Consumer::next) keeps reconnecting for as
/// long as it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Bounds {
    /// The longest wait for one connection attempt, including `connect` itself.
    pub connect_timeout: Duration,
    /// The longest wait for `publish` (and for ack and nack) to be confirmed, reconnects
    /// included.
    pub publish_timeout: Duration,
    /// The first delay between reconnect attempts.
    pub reconnect_min_delay: Duration,
    /// The longest delay between reconnect attempts.
    pub reconnect_max_delay: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
        }
    }
}

impl Bounds {
    /// Sets [`Bounds::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`Bounds::publish_timeout`].
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the reconnect backoff's first and longest delays.
    pub fn reconnect_delays(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max.max(min);
        self
    }
}

/// Options of the Redis Streams backend ([`crate::redis::RedisQueue`], feature `redis`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port/db` (or `rediss://`).
    pub url: String,
    /// Prefix of every key the backend writes (`{prefix}:{topic}`...).
    pub key_prefix: String,
    /// How often a waiting consumer moves due delayed nacks and takes back deliveries past
    /// their ack deadline; also the longest single `XREADGROUP ... BLOCK`.
    pub poll_interval: Duration,
    /// Approximate cap on a topic's stream length (`XADD MAXLEN ~`); `None` keeps everything.
    /// A cap can drop messages a slow group has not read yet.
    pub max_stream_length: Option<u64>,
    /// Lets Redis delete a topic's keys after this long without a publish (the groups'
    /// streams: after this long from their creation); `None` keeps them. For short-lived topics
    /// (tests) only: an expired stream loses what it held.
    pub key_expiry: Option<Duration>,
    /// Time bounds.
    pub bounds: Bounds,
}

impl RedisOptions {
    /// Options for the server at `url`, with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "deployd".to_owned(),
            poll_interval: Duration::from_millis(100),
            max_stream_length: None,
            key_expiry: None,
            bounds: Bounds::default(),
        }
    }

    /// Builds the URL from llama_deploy's separate fields.
    pub fn from_parts(
        host: &str,
        port: u16,
        db: u32,
        username: Option<&str>,
        password: Option<&str>,
        tls: bool,
    ) -> Self {
        let scheme = if tls { "rediss" } else { "redis" };
        let auth = credentials(username, password);
        Self::new(format!("{scheme}://{auth}{host}:{port}/{db}"))
    }

    /// Sets [`RedisOptions::bounds`].
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self::new("redis://127.0.0.1:6379/0")
    }
}

/// Options of the RabbitMQ backend ([`crate::rabbitmq::RabbitMqQueue`], feature `rabbitmq`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitMqOptions {
    /// `amqp://user:password@host:port/vhost` (the default vhost `/` is `%2f`).
    pub url: String,
    /// Prefix of the exchanges and queues the backend declares (llama_deploy's
    /// `exchange_name`): topic `t` is exchange `{prefix}.t`, group `g` on it is queue
    /// `{prefix}.t.g`.
    pub exchange_prefix: String,
    /// How many unacked messages the broker may push to one consumer ahead of `next`
    /// (at least 2).
    pub prefetch: u16,
    /// Lets RabbitMQ delete a group's queue (and what it holds) after it had no consumer for
    /// this long (`x-expires`); `None` keeps queues. For short-lived groups (tests) only. A
    /// queue keeps the setting it was declared with: changing it needs the queue deleted.
    pub group_expiry: Option<Duration>,
    /// Time bounds.
    pub bounds: Bounds,
}

impl RabbitMqOptions {
    /// Options for the broker at `url`, with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange_prefix: "deployd".to_owned(),
            prefetch: 2,
            group_expiry: None,
            bounds: Bounds::default(),
        }
    }

    /// Builds the URL from llama_deploy's separate fields.
    pub fn from_parts(
        host: &str,
        port: u16,
        username: &str,
        password: &str,
        vhost: &str,
        tls: bool,
    ) -> Self {
        let scheme = if tls { "amqps" } else { "amqp" };
        let auth = credentials(Some(username), Some(password));
        let vhost = if vhost.is_empty() || vhost == "/" {
            "%2f".to_owned()
        } else {
            percent_encode(vhost)
        };
        Self::new(format!("{scheme}://{auth}{host}:{port}/{vhost}"))
    }

    /// Sets [`RabbitMqOptions::bounds`].
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }
}

impl Default for RabbitMqOptions {
    fn default() -> Self {
        Self::new("amqp://guest:guest@127.0.0.1:5672/%2f")
    }
}

/// Options of the NATS JetStream backend ([`crate::nats::NatsQueue`], feature `nats`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsOptions {
    /// `nats://[user:password@]host:port`; several servers separated by commas.
    pub url: String,
    /// Name of the JetStream stream that holds every topic, and first token of the subjects:
    /// topic `t` is subject `{prefix}.t` of stream `{prefix}`.
    pub stream_prefix: String,
    /// How long a payload too large for one NATS message is kept in the object store bucket
    /// `{prefix}-payloads` (it must outlive every redelivery of its message).
    pub large_payload_ttl: Duration,
    /// Removes a group (its durable consumer, and with it the messages kept only for it) after
    /// it had no member for this long; `None` keeps groups forever. Every group costs the
    /// server work on each publish, so short-lived groups (tests) should set it.
    pub group_expiry: Option<Duration>,
    /// Time bounds.
    pub bounds: Bounds,
}

impl NatsOptions {
    /// Options for the server at `url`, with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream_prefix: "deployd".to_owned(),
            large_payload_ttl: Duration::from_secs(7 * 24 * 60 * 60),
            group_expiry: None,
            bounds: Bounds::default(),
        }
    }

    /// Sets [`NatsOptions::bounds`].
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self::new("nats://127.0.0.1:4222")
    }
}

/// Options of the Kafka backend ([`crate::kafka::KafkaQueue`], feature `kafka`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaOptions {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Prefix of the topics the backend uses: topic `t` is Kafka topic `{prefix}.t`, and group
    /// `g` on it is consumer group `{prefix}.t.g`.
    pub topic_prefix: String,
    /// How many partitions a topic the backend creates gets. One (the default) keeps publish
    /// order per topic, and one process of a group reads the topic at a time; more let as many
    /// processes share a topic, with order kept per partition only.
    pub partitions: i32,
    /// The replication factor of the topics the backend creates; `None` takes the broker's
    /// default.
    pub replication_factor: Option<i32>,
    /// The consumer group session timeout: a process that stopped heartbeating for this long
    /// leaves its group, and its partitions (with what it held unacked) go to another
    /// process. Kafka accepts 6 to 300 seconds by default; tansu completes a group join after
    /// half of it, so it also bounds how long a new group takes to start receiving.
    pub session_timeout: Duration,
    /// Extra librdkafka settings (`security.protocol`, `sasl.*`, ...), applied last.
    pub extra: Vec<(String, String)>,
    /// Time bounds.
    pub bounds: Bounds,
}

impl KafkaOptions {
    /// Options for the cluster at `brokers`, with defaults for the rest.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "deployd".to_owned(),
            partitions: 1,
            replication_factor: None,
            session_timeout: Duration::from_secs(6),
            extra: Vec::new(),
            bounds: Bounds::default(),
        }
    }

    /// Sets [`KafkaOptions::bounds`].
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }
}

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `extra` may hold `sasl.password` and the like: values of secret-looking keys are
        // replaced.
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(key, value)| {
                let secret = ["password", "secret", "token", "key"]
                    .iter()
                    .any(|word| key.to_ascii_lowercase().contains(word));
                (key.as_str(), if secret { "***" } else { value.as_str() })
            })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("session_timeout", &self.session_timeout)
            .field("extra", &extra)
            .field("bounds", &self.bounds)
            .finish()
    }
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self::new("127.0.0.1:9092")
    }
}

/// Options of the Amazon SQS backend ([`crate::sqs::SqsQueue`], feature `sqs`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqsOptions {
    /// The AWS region (`us-east-1`).
    pub region: String,
    /// An endpoint other than AWS's, such as `http://127.0.0.1:5000` for moto.
    pub endpoint: Option<String>,
    /// Static credentials; without them the backend uses `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` from the environment.
    pub access_key_id: Option<String>,
    /// See [`SqsOptions::access_key_id`].
    pub secret_access_key: Option<String>,
    /// See [`SqsOptions::access_key_id`].
    pub session_token: Option<String>,
    /// Prefix of the queue names: group `g` of topic `t` is queue `{prefix}-t--g` (dots
    /// become `_`).
    pub queue_prefix: String,
    /// Time bounds.
    pub bounds: Bounds,
}

impl std::fmt::Debug for SqsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsOptions")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("queue_prefix", &self.queue_prefix)
            .field("bounds", &self.bounds)
            .finish()
    }
}

impl SqsOptions {
    /// Options for `region`, with defaults for the rest.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            queue_prefix: "deployd".to_owned(),
            bounds: Bounds::default(),
        }
    }

    /// Sets [`SqsOptions::endpoint`].
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sets static credentials.
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.access_key_id = Some(access_key_id.into());
        self.secret_access_key = Some(secret_access_key.into());
        self
    }

    /// Sets [`SqsOptions::bounds`].
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }
}

/// Which message queue to use, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueConfig {
    /// The in-process queue ([`crate::memory::MemoryQueue`]); the default.
    #[default]
    Memory,
    /// Redis Streams (feature `redis`).
    Redis(RedisOptions),
    /// RabbitMQ (feature `rabbitmq`).
    RabbitMq(RabbitMqOptions),
    /// NATS JetStream (feature `nats`).
    Nats(NatsOptions),
    /// Kafka (feature `kafka`).
    Kafka(KafkaOptions),
    /// Amazon SQS (feature `sqs`).
    Sqs(SqsOptions),
}

impl QueueConfig {
    /// The backend's name, as a person would write it.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Memory => "in-memory",
            Self::Redis(_) => "Redis",
            Self::RabbitMq(_) => "RabbitMQ",
            Self::Nats(_) => "NATS",
            Self::Kafka(_) => "Kafka",
            Self::Sqs(_) => "SQS",
        }
    }
}

/// Connects to the queue `config` names.
///
/// Fails with [`Error::Unsupported`] when the backend's feature is off, with
/// [`Error::InvalidConfig`] for unusable options, and with [`Error::Unavailable`] when the
/// broker cannot be reached within [`Bounds::connect_timeout`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), deployd_queue::Error> {
/// let queue = deployd_queue::connect(&deployd_queue::QueueConfig::Memory).await?;
/// # let _ = queue;
/// # Ok(())
/// # }
/// ```
pub async fn connect(config: &QueueConfig) -> Result<Arc<dyn MessageQueue>, Error> {
    match config {
        QueueConfig::Memory => Ok(Arc::new(crate::memory::MemoryQueue::new())),
        #[cfg(feature = "redis")]
        QueueConfig::Redis(options) => Ok(Arc::new(
            crate::redis::RedisQueue::connect(options.clone()).await?,
        )),
        #[cfg(feature = "rabbitmq")]
        QueueConfig::RabbitMq(options) => Ok(Arc::new(
            crate::rabbitmq::RabbitMqQueue::connect(options.clone()).await?,
        )),
        #[cfg(feature = "nats")]
        QueueConfig::Nats(options) => Ok(Arc::new(
            crate::nats::NatsQueue::connect(options.clone()).await?,
        )),
        #[cfg(feature = "kafka")]
        QueueConfig::Kafka(options) => Ok(Arc::new(
            crate::kafka::KafkaQueue::connect(options.clone()).await?,
        )),
        #[cfg(feature = "sqs")]
        QueueConfig::Sqs(options) => Ok(Arc::new(
            crate::sqs::SqsQueue::connect(options.clone()).await?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(Error::Unsupported {
            backend: other.backend_name(),
            feature: feature_of(other),
        }),
    }
}

fn feature_of(config: &QueueConfig) -> &'static str {
    match config {
        QueueConfig::Memory => "",
        QueueConfig::Redis(_) => "redis",
        QueueConfig::RabbitMq(_) => "rabbitmq",
        QueueConfig::Nats(_) => "nats",
        QueueConfig::Kafka(_) => "kafka",
        QueueConfig::Sqs(_) => "sqs",
    }
}

/// Debug output with the URL's password replaced, so that options can be logged.
macro_rules! debug_redacting_url {
    ($type:ty { $($field:ident),* }) => {
        impl std::fmt::Debug for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($type))
                    .field("url", &redact_url(&self.url))
                    $(.field(stringify!($field), &self.$field))*
                    .finish()
            }
        }
    };
}

debug_redacting_url!(RedisOptions {
    key_prefix,
    poll_interval,
    max_stream_length,
    bounds
});
debug_redacting_url!(RabbitMqOptions {
    exchange_prefix,
    prefetch,
    bounds
});
debug_redacting_url!(NatsOptions {
    stream_prefix,
    large_payload_ttl,
    bounds
});

/// `url` with the password of every `user:password@` replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let Some((scheme, rest)) = part.split_once("://") else {
                return part.to_owned();
            };
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    format!("{scheme}://{user}:***@{host}{path}")
                }
                None => part.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `user:password@`, percent-encoded, or nothing.
fn credentials(username: Option<&str>, password: Option<&str>) -> String {
    match (username.filter(|u| !u.is_empty()), password) {
        (None, None) => String::new(),
        (None, Some(password)) => format!(":{}@", percent_encode(password)),
        (Some(user), None) => format!("{}@", percent_encode(user)),
        (Some(user), Some(password)) => {
            format!("{}:{}@", percent_encode(user), percent_encode(password))
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_from_parts() {
        let redis = RedisOptions::from_parts("h", 6380, 2, None, Some("p@ss"), false);
        assert_eq!(redis.url, "redis://:p%40ss@h:6380/2");
        let rabbit = RabbitMqOptions::from_parts("h", 5672, "guest", "guest", "/", false);
        assert_eq!(rabbit.url, "amqp://guest:guest@h:5672/%2f");
        let rabbit = RabbitMqOptions::from_parts("h", 5671, "u", "p", "prod/eu", true);
        assert_eq!(rabbit.url, "amqps://u:p@h:5671/prod%2Feu");
    }

    #[test]
    fn secrets_are_not_printed() {
        let sqs = SqsOptions::new("us-east-1").credentials("AKID", "very-secret");
        assert!(!format!("{sqs:?}").contains("very-secret"));
        let redis = RedisOptions::new("redis://user:very-secret@h:6379/0");
        assert!(!format!("{redis:?}").contains("very-secret"));
        let rabbit = RabbitMqOptions::new("amqp://guest:very-secret@h:5672/%2f");
        assert!(format!("{rabbit:?}").contains("amqp://guest:***@h:5672/%2f"));
        let nats = NatsOptions::new("nats://a:very-secret@h1:4222,nats://b:x@h2:4222");
        assert!(!format!("{nats:?}").contains("very-secret"));
        let mut kafka = KafkaOptions::new("h:9092");
        kafka.extra = vec![
            ("sasl.password".into(), "very-secret".into()),
            ("ssl.key.password".into(), "very-secret".into()),
            ("security.protocol".into(), "SASL_SSL".into()),
        ];
        let printed = format!("{kafka:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(printed.contains("SASL_SSL"), "{printed}");
    }

    #[tokio::test]
    async fn memory_is_always_there() {
        assert!(connect(&QueueConfig::default()).await.is_ok());
    }

    #[cfg(not(feature = "kafka"))]
    #[tokio::test]
    async fn kafka_left_out_names_its_feature() {
        let Err(err) = connect(&QueueConfig::Kafka(KafkaOptions::default())).await else {
            panic!("kafka is not built in");
        };
        assert!(matches!(
            err,
            Error::Unsupported {
                backend: "Kafka",
                feature: "kafka"
            }
        ));
        assert_eq!(
            err.to_string(),
            "the Kafka message queue is not built in: rebuild deployd-queue with the `kafka` \
             feature"
        );
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn a_backend_left_out_names_its_feature() {
        let Err(err) = connect(&QueueConfig::Redis(RedisOptions::default())).await else {
            panic!("redis is not built in");
        };
        assert_eq!(
            err.to_string(),
            "the Redis message queue is not built in: rebuild deployd-queue with the `redis` \
             feature"
        );
    }
}
