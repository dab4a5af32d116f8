//! Choosing and configuring a backend: [`QueueConfig`], the options of every backend, and
//! [`connect`].
//!
//! These types are plain data and exist whatever features are enabled, so that a caller (the
//! manager) can map its own configuration onto them; [`connect`] fails with
//! [`Error::Unsupported`] for a backend whose feature is off.

use std::sync::Arc;
use std::time::Duration;

use crate::address::{self, percent_encode};
use crate::redact::{Secrets, is_secret_key, redact_url};
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
    /// `amqp://user:password@host:port/vhost`. As in llama_deploy's client, no path or a lone
    /// `/` is the default vhost `/`, as is `/%2f`; `/other` is vhost `other`.
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
    /// `nats://[user:password@]host:port`, or a user name alone as a token (`nats://token@h`);
    /// several servers separated by commas, the scheme optional after the first
    /// (`nats://u:pw@h1:4222,u:pw@h2:4222`). The client authenticates to every server with one
    /// set of credentials, so entries that carry them must agree.
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
                let shown = if is_secret_key(key) { "***" } else { value };
                (key.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &redact_url(&self.brokers))
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
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
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

    /// Where the configuration points, without credentials, for messages: `Redis at
    /// redis://u:***@h:6379/0`, `NATS at nats://a:***@h1:4222,b:***@h2:4222`, `Kafka at
    /// h1:9092,h2:9092`, `SQS in us-east-1`. URLs go through [`redact_url`].
    ///
    /// ```
    /// use deployd_queue::QueueConfig;
    /// use deployd_queue::config::RedisOptions;
    ///
    /// let config = QueueConfig::Redis(RedisOptions::new("redis://u:pw@h:6379/0"));
    /// assert_eq!(config.describe(), "Redis at redis://u:***@h:6379/0");
    /// ```
    pub fn describe(&self) -> String {
        match self {
            Self::Memory => self.backend_name().to_owned(),
            Self::Redis(options) => format!("Redis at {}", redact_url(&options.url)),
            Self::RabbitMq(options) => format!("RabbitMQ at {}", redact_url(&options.url)),
            Self::Nats(options) => format!("NATS at {}", redact_url(&options.url)),
            Self::Kafka(options) => format!("Kafka at {}", redact_url(&options.brokers)),
            Self::Sqs(options) => match &options.endpoint {
                Some(endpoint) => {
                    format!("SQS at {} ({})", redact_url(endpoint), options.region)
                }
                None => format!("SQS in {}", options.region),
            },
        }
    }

    /// Checks the broker address of the configuration without connecting: a malformed URL
    /// (`redis://h:notaport`, `amqp://`, `amqp://h:99999`), an empty or malformed entry of a
    /// NATS server list or of Kafka's bootstrap servers, an unknown scheme. Fails with
    /// [`Error::InvalidConfig`], whose message names the problem and quotes the address
    /// redacted. [`connect`] checks first; each backend's own `connect` does too.
    ///
    /// ```
    /// use deployd_queue::{Error, QueueConfig};
    /// use deployd_queue::config::RedisOptions;
    ///
    /// let config = QueueConfig::Redis(RedisOptions::new("redis://u:pw@h:notaport/0"));
    /// let Err(Error::InvalidConfig(message)) = config.validate() else { panic!() };
    /// assert_eq!(
    ///     message,
    ///     "Redis URL `redis://u:***@h:notaport/0`: the port is not a number from 1 to 65535"
    /// );
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Self::Memory => Ok(()),
            Self::Redis(options) => options.validate(),
            Self::RabbitMq(options) => options.validate(),
            Self::Nats(options) => options.validate(),
            Self::Kafka(options) => options.validate(),
            Self::Sqs(options) => options.validate(),
        }
    }
}

impl RedisOptions {
    /// See [`QueueConfig::validate`].
    pub(crate) fn validate(&self) -> Result<(), Error> {
        address::check_redis_url(&self.url)
    }
}

impl RabbitMqOptions {
    /// See [`QueueConfig::validate`].
    pub(crate) fn validate(&self) -> Result<(), Error> {
        address::check_amqp_url(&self.url)
    }
}

impl NatsOptions {
    /// See [`QueueConfig::validate`].
    pub(crate) fn validate(&self) -> Result<(), Error> {
        address::nats_servers(&self.url).map(|_| ())
    }
}

impl KafkaOptions {
    /// See [`QueueConfig::validate`].
    pub(crate) fn validate(&self) -> Result<(), Error> {
        address::check_kafka_brokers(&self.brokers)
    }
}

impl SqsOptions {
    /// See [`QueueConfig::validate`].
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let region_ok = !self.region.is_empty()
            && self
                .region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !region_ok {
            return Err(Error::InvalidConfig(format!(
                "SQS region `{}` must be letters, digits and `-` (us-east-1)",
                self.region
            )));
        }
        match &self.endpoint {
            Some(endpoint) => address::check_http_endpoint(endpoint),
            None => Ok(()),
        }
    }
}

/// Connects to the queue `config` names.
///
/// Fails with [`Error::InvalidConfig`] for unusable options (checked by
/// [`QueueConfig::validate`] before anything else), with [`Error::Unsupported`] when the
/// backend's feature is off, and with [`Error::Unavailable`] when the broker cannot be reached
/// within [`Bounds::connect_timeout`]. No error message holds a credential of `config`.
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
    config.validate()?;
    // Each backend hides its secrets already; this covers what a client library adds.
    let secrets = Secrets::of(config);
    connect_checked(config)
        .await
        .map_err(|err| secrets.scrub_error(err))
}

async fn connect_checked(config: &QueueConfig) -> Result<Arc<dyn MessageQueue>, Error> {
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

    const SECRET: &str = "very-secret";

    /// Neither the Debug output nor the description of `config` shows a secret.
    fn assert_hidden_in_config(config: &QueueConfig) {
        let debug = format!("{config:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        let described = config.describe();
        assert!(!described.contains(SECRET), "{described}");
    }

    #[test]
    fn every_form_of_credential_is_hidden_in_debug_and_describe() {
        let redis = |url: &str| QueueConfig::Redis(RedisOptions::new(url));
        let rabbitmq = |url: &str| QueueConfig::RabbitMq(RabbitMqOptions::new(url));
        let nats = |url: &str| QueueConfig::Nats(NatsOptions::new(url));
        let mut kafka = KafkaOptions::new("h1:9092,h2:9092");
        kafka.extra = vec![
            ("sasl.password".into(), "very-secret-1".into()),
            ("ssl.key.password".into(), "very-secret-2".into()),
            (
                "sasl.oauthbearer.client.secret".into(),
                "very-secret-3".into(),
            ),
            (
                "sasl.oauthbearer.config".into(),
                "secret=very-secret-4".into(),
            ),
            ("security.protocol".into(), "SASL_SSL".into()),
        ];
        let sqs = SqsOptions::new("us-east-1")
            .endpoint("http://u:very-secret-1@127.0.0.1:5000")
            .credentials("AKID", "very-secret-2");
        let cases = [
            (
                redis("redis://u:very-secret@h:6379/0"),
                "Redis at redis://u:***@h:6379/0",
            ),
            (
                redis("redis://:very-secret@h:6379/0"),
                "Redis at redis://:***@h:6379/0",
            ),
            (
                redis("redis://h:6379/0?password=very-secret"),
                "Redis at redis://h:6379/0?password=***",
            ),
            (
                rabbitmq("amqp://guest:very-secret@h/"),
                "RabbitMQ at amqp://guest:***@h/",
            ),
            (
                rabbitmq("amqps://u:very%2Dsecret@h:5671/%2f?auth_token=very-secret"),
                "RabbitMQ at amqps://u:***@h:5671/%2f?auth_token=***",
            ),
            (
                nats("nats://a:very-secret-1@h1:4222,nats://b:very-secret-2@h2:4222"),
                "NATS at nats://a:***@h1:4222,nats://b:***@h2:4222",
            ),
            (
                nats("nats://a:very-secret-1@h1:4222,b:very-secret-2@h2:4222"),
                "NATS at nats://a:***@h1:4222,b:***@h2:4222",
            ),
            (
                nats("nats://very-secret@h1:4222"),
                "NATS at nats://***@h1:4222",
            ),
            (
                nats("nats://h1:4222?token=very-secret"),
                "NATS at nats://h1:4222?token=***",
            ),
            (QueueConfig::Kafka(kafka), "Kafka at h1:9092,h2:9092"),
            (
                QueueConfig::Kafka(KafkaOptions::new("u:very-secret@h1:9092,h2:9092")),
                "Kafka at u:***@h1:9092,h2:9092",
            ),
            (
                QueueConfig::Sqs(sqs),
                "SQS at http://u:***@127.0.0.1:5000 (us-east-1)",
            ),
            (
                QueueConfig::Sqs(SqsOptions::new("us-east-1")),
                "SQS in us-east-1",
            ),
            (QueueConfig::Memory, "in-memory"),
        ];
        for (config, described) in cases {
            assert_hidden_in_config(&config);
            assert_eq!(config.describe(), described);
        }
    }

    #[tokio::test]
    async fn malformed_addresses_are_invalid_before_any_connection() {
        let cases = [
            (
                QueueConfig::Redis(RedisOptions::new("redis://u:very-secret@h:notaport")),
                "Redis URL `redis://u:***@h:notaport`: the port is not a number from 1 to 65535",
            ),
            (
                QueueConfig::Redis(RedisOptions::new("http://h:6379")),
                "Redis URL `http://h:6379`: unknown scheme `http`: use redis:// or rediss://",
            ),
            (
                QueueConfig::RabbitMq(RabbitMqOptions::new("amqp://")),
                "RabbitMQ URL `amqp://`: the host is missing",
            ),
            (
                QueueConfig::RabbitMq(RabbitMqOptions::new("amqp://guest:very-secret@h:99999")),
                "RabbitMQ URL `amqp://guest:***@h:99999`: the port is not a number from 1 to \
                 65535",
            ),
            (
                QueueConfig::Nats(NatsOptions::new("nats://u:very-secret@h1:4222,")),
                "NATS server list `nats://u:***@h1:4222,`: entry 2 is empty",
            ),
            (
                QueueConfig::Nats(NatsOptions::new("nats://h1:4222,u:very-secret@h2:x")),
                "NATS server list `nats://h1:4222,u:***@h2:x`: entry 2: the port is not a number \
                 from 1 to 65535",
            ),
            (
                QueueConfig::Kafka(KafkaOptions::new("h1:9092,h2:port")),
                "Kafka bootstrap servers `h1:9092,h2:port`: entry 2: the port is not a number \
                 from 1 to 65535",
            ),
            (
                QueueConfig::Sqs(SqsOptions::new("us-east-1").endpoint("127.0.0.1:5000")),
                "SQS endpoint `127.0.0.1:5000`: the scheme is missing: write http://host:port or \
                 https://host",
            ),
        ];
        for (config, expected) in cases {
            let expected = format!("invalid message queue configuration: {expected}");
            let Err(err) = config.validate() else {
                panic!("{} is valid", config.describe());
            };
            assert_eq!(err.to_string(), expected);
            // `connect` checks first, with or without the backend's feature.
            let Err(err) = connect(&config).await else {
                panic!("connected to {}", config.describe());
            };
            assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
            assert_eq!(err.to_string(), expected);
        }
        for config in [
            QueueConfig::Memory,
            QueueConfig::Redis(RedisOptions::default()),
            QueueConfig::RabbitMq(RabbitMqOptions::default()),
            QueueConfig::Nats(NatsOptions::default()),
            QueueConfig::Kafka(KafkaOptions::default()),
            QueueConfig::Sqs(SqsOptions::new("us-east-1")),
        ] {
            assert!(config.validate().is_ok(), "{}", config.describe());
        }
    }

    /// Bounds that give up on a dead port quickly.
    #[cfg(any(
        feature = "redis",
        feature = "rabbitmq",
        feature = "nats",
        feature = "kafka",
        feature = "sqs"
    ))]
    fn short_bounds() -> Bounds {
        Bounds::default()
            .connect_timeout(Duration::from_millis(300))
            .publish_timeout(Duration::from_millis(300))
            .reconnect_delays(Duration::from_millis(10), Duration::from_millis(50))
    }

    /// Connects to `config`, which must fail: neither the error nor a line logged meanwhile
    /// may show a secret.
    #[cfg(any(
        feature = "redis",
        feature = "rabbitmq",
        feature = "nats",
        feature = "kafka",
        feature = "sqs"
    ))]
    async fn failed_connect(config: QueueConfig) -> Error {
        assert_hidden_in_config(&config);
        let (logs, _guard) = crate::captured_logs::CapturedLogs::start();
        let Err(err) = connect(&config).await else {
            panic!("connected to {}", config.describe());
        };
        for shown in [err.to_string(), format!("{err:?}")]
            .into_iter()
            .chain(logs.lines())
        {
            assert!(!shown.contains(SECRET), "a secret shows in {shown:?}");
        }
        err
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_failed_redis_connect_shows_no_password() {
        for url in [
            "redis://u:very-secret@127.0.0.1:1/0",
            "redis://:very-secret@127.0.0.1:1/0",
        ] {
            let options = RedisOptions::new(url).bounds(short_bounds());
            let err = failed_connect(QueueConfig::Redis(options)).await;
            assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        }
    }

    #[cfg(feature = "rabbitmq")]
    #[tokio::test]
    async fn a_failed_rabbitmq_connect_shows_no_password() {
        let options =
            RabbitMqOptions::new("amqp://guest:very-secret@127.0.0.1:1/").bounds(short_bounds());
        let err = failed_connect(QueueConfig::RabbitMq(options)).await;
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }

    #[cfg(feature = "nats")]
    #[tokio::test]
    async fn a_failed_nats_connect_shows_no_password_of_its_list() {
        for url in [
            "nats://u:very-secret@127.0.0.1:1",
            "nats://u:very-secret@127.0.0.1:1,u:very-secret@127.0.0.1:2",
            "nats://127.0.0.1:1,nats://u:very-secret@127.0.0.1:2",
            "nats://very-secret@127.0.0.1:1, 127.0.0.1:2",
        ] {
            let options = NatsOptions::new(url).bounds(short_bounds());
            let err = failed_connect(QueueConfig::Nats(options)).await;
            assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        }
        // Two sets of credentials: refused before connecting, both hidden.
        let options = NatsOptions::new(
            "nats://a:very-secret-1@127.0.0.1:1,nats://b:very-secret-2@127.0.0.1:2",
        )
        .bounds(short_bounds());
        let err = failed_connect(QueueConfig::Nats(options)).await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    }

    #[cfg(feature = "kafka")]
    #[tokio::test]
    async fn a_failed_kafka_connect_shows_no_secret() {
        let sasl = |secret: &str| -> Vec<(String, String)> {
            [
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanisms", "PLAIN"),
                ("sasl.username", "u"),
                ("sasl.password", secret),
            ]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect()
        };
        let mut options = KafkaOptions::new("127.0.0.1:1").bounds(short_bounds());
        options.extra = sasl("very-secret");
        let err = failed_connect(QueueConfig::Kafka(options)).await;
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");

        // librdkafka quotes the value of a setting it refuses.
        let mut options = KafkaOptions::new("127.0.0.1:1").bounds(short_bounds());
        options.extra = vec![("sasl.oauthbearer.method".into(), "very-secret".into())];
        let err = failed_connect(QueueConfig::Kafka(options)).await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");

        let options = KafkaOptions::new("u:very-secret@127.0.0.1:1").bounds(short_bounds());
        let err = failed_connect(QueueConfig::Kafka(options)).await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    }

    #[cfg(feature = "sqs")]
    #[tokio::test]
    async fn a_failed_sqs_connect_shows_no_secret() {
        let options = SqsOptions::new("us-east-1")
            .endpoint("http://127.0.0.1:1")
            .credentials("AKID", "very-secret")
            .bounds(short_bounds());
        let err = failed_connect(QueueConfig::Sqs(options)).await;
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        // The SDK would log an endpoint's user info.
        let options = SqsOptions::new("us-east-1")
            .endpoint("http://u:very-secret@127.0.0.1:1")
            .credentials("AKID", "very-secret-2")
            .bounds(short_bounds());
        let err = failed_connect(QueueConfig::Sqs(options)).await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
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
