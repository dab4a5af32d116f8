//! Which message queue a deployment's tasks go through: the deployment file's `message-queue`
//! mapped onto [`QueueConfig`], and the topics deployd uses on it.
//!
//! Every deployment has its own connection. Topics carry a prefix of the data directory's node
//! id, so that two deployd servers (or two test runs) sharing one broker never take each
//! other's tasks: a task is only meaningful to the server whose store holds it.

use std::sync::Arc;

use deployd_config::MessageQueueSpec;
use deployd_queue::{MessageQueue, QueueConfig};

use crate::Error;

/// The queue a deployment file asks for; the embedded queue when it names none.
pub(crate) fn config_of(spec: Option<&MessageQueueSpec>) -> QueueConfig {
    use deployd_queue::config::{
        KafkaOptions, NatsOptions, RabbitMqOptions, RedisOptions, SqsOptions,
    };
    match spec {
        None | Some(MessageQueueSpec::Simple) => QueueConfig::Memory,
        // llama_deploy's `exclusive_mode` made one consumer take a topic's messages; every
        // deployd group already hands each task to exactly one worker, so it changes nothing.
        Some(MessageQueueSpec::Redis { url, .. }) => QueueConfig::Redis(RedisOptions::new(url)),
        Some(MessageQueueSpec::RabbitMq { url, exchange, .. }) => {
            let mut options = RabbitMqOptions::new(url);
            options.exchange_prefix.clone_from(exchange);
            QueueConfig::RabbitMq(options)
        }
        Some(MessageQueueSpec::Kafka { url, .. }) => QueueConfig::Kafka(KafkaOptions::new(url)),
        Some(MessageQueueSpec::Nats { url, .. }) => QueueConfig::Nats(NatsOptions::new(url)),
        Some(MessageQueueSpec::Aws {
            region,
            access_key_id,
            secret_access_key,
            ..
        }) => {
            let mut options = SqsOptions::new(region);
            if let (Some(id), Some(secret)) = (access_key_id, secret_access_key) {
                options = options.credentials(id, secret);
            }
            // The AWS SDKs' own variables for another endpoint (LocalStack, moto, a VPC one).
            let endpoint = ["AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()));
            if let Some(endpoint) = endpoint {
                options = options.endpoint(endpoint);
            }
            QueueConfig::Sqs(options)
        }
        Some(other) => {
            // `MessageQueueSpec` is non-exhaustive; a kind the config crate learns before this
            // mapping does is refused by `connect`'s caller through `describe`. Only the
            // variant's name is logged: its fields may hold a URL with a password.
            let debug = format!("{other:?}");
            let kind = debug
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or_default();
            tracing::warn!(
                kind,
                "unknown message queue kind; the embedded queue is used"
            );
            QueueConfig::Memory
        }
    }
}

/// Where `config` points, without credentials, for messages: the queue crate's redactor
/// knows every form a broker address takes (server lists, tokens, secret query parameters).
pub(crate) fn describe(config: &QueueConfig) -> String {
    config.describe()
}

/// Connects to the queue `config` names. A backend this build lacks, or unusable options, are
/// the deployment file's fault (a 400); a broker that does not answer is a 503.
pub(crate) async fn connect(config: &QueueConfig) -> Result<Arc<dyn MessageQueue>, Error> {
    deployd_queue::connect(config).await.map_err(|err| {
        let place = describe(config);
        match err {
            deployd_queue::Error::Unsupported { .. } | deployd_queue::Error::InvalidConfig(_) => {
                Error::BadRequest(format!("message-queue ({place}): {err}"))
            }
            other => {
                Error::Unavailable(format!("message-queue: cannot connect to {place}: {other}"))
            }
        }
    })
}

/// The topic of a service's tasks: `deployd.{scope}.{deployment}.{service}`, where the scope
/// is [`topic_scope`]'s. Deployment names, service ids and cluster names are letters, digits,
/// `-` and `_`, so the topic suits every broker's naming rules.
pub(crate) fn task_topic(scope: &str, deployment: &str, service: &str) -> String {
    format!("deployd.{scope}.{deployment}.{service}")
}

/// What a node's topics are named after: its cluster's name, which every node of the cluster
/// consumes; or, alone, the first twelve characters of its node id.
pub(crate) fn topic_scope(cluster: Option<&str>, node_id: &str) -> String {
    match cluster {
        Some(name) => name.to_owned(),
        None => node_id.chars().take(12).collect(),
    }
}

/// The queue a `--queue` URL names: `redis://` or `rediss://` (Redis Streams), `amqp://` or
/// `amqps://` (RabbitMQ), `nats://` (NATS JetStream), `kafka://host:port,...` (Kafka's
/// bootstrap servers) or `sqs://region` (Amazon SQS).
pub(crate) fn config_from_url(url: &str) -> Result<QueueConfig, String> {
    use deployd_queue::config::{
        KafkaOptions, NatsOptions, RabbitMqOptions, RedisOptions, SqsOptions,
    };
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    Ok(match scheme {
        Some("redis" | "rediss") => QueueConfig::Redis(RedisOptions::new(url)),
        Some("amqp" | "amqps") => QueueConfig::RabbitMq(RabbitMqOptions::new(url)),
        Some("nats" | "tls") => QueueConfig::Nats(NatsOptions::new(url)),
        Some("kafka") => QueueConfig::Kafka(KafkaOptions::new(&url["kafka://".len()..])),
        Some("sqs") => QueueConfig::Sqs(SqsOptions::new(&url["sqs://".len()..])),
        _ => {
            return Err(format!(
                "queue {}: expected a redis://, rediss://, amqp://, amqps://, nats://, \
                 kafka:// or sqs:// URL",
                deployd_queue::redact_url(url)
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_queue_and_simple_are_the_embedded_queue() {
        assert_eq!(config_of(None), QueueConfig::Memory);
        assert_eq!(
            config_of(Some(&MessageQueueSpec::Simple)),
            QueueConfig::Memory
        );
    }

    #[test]
    fn topics_are_namespaced_by_node_or_by_cluster() {
        let alone = topic_scope(None, "0123456789abcdef0123");
        assert_eq!(
            task_topic(&alone, "quickstart", "echo_workflow"),
            "deployd.0123456789ab.quickstart.echo_workflow"
        );
        assert_ne!(
            topic_scope(None, "aaaaaaaaaaaa0"),
            topic_scope(None, "bbbbbbbbbbbb0")
        );
        // Every node of a cluster consumes the same topics.
        let clustered = topic_scope(Some("prod-eu"), "0123456789abcdef0123");
        assert_eq!(
            task_topic(&clustered, "d", "s"),
            task_topic(&topic_scope(Some("prod-eu"), "ffff"), "d", "s")
        );
        assert_eq!(task_topic(&clustered, "d", "s"), "deployd.prod-eu.d.s");
    }

    #[test]
    fn a_queue_url_names_its_broker() {
        assert!(matches!(
            config_from_url("redis://127.0.0.1:6379/0"),
            Ok(QueueConfig::Redis(_))
        ));
        assert!(matches!(
            config_from_url("amqps://u:p@host/vhost"),
            Ok(QueueConfig::RabbitMq(_))
        ));
        assert!(matches!(
            config_from_url("nats://127.0.0.1:4222"),
            Ok(QueueConfig::Nats(_))
        ));
        assert!(matches!(
            config_from_url("kafka://127.0.0.1:9092"),
            Ok(QueueConfig::Kafka(_))
        ));
        assert!(matches!(
            config_from_url("sqs://eu-west-1"),
            Ok(QueueConfig::Sqs(_))
        ));
        let err = config_from_url("mqtt://user:hunter2@broker").unwrap_err();
        assert!(
            err.contains("redis://") && !err.contains("hunter2"),
            "{err}"
        );
    }

    fn nats(url: &str) -> QueueConfig {
        QueueConfig::Nats(deployd_queue::config::NatsOptions::new(url))
    }

    #[test]
    fn descriptions_hide_every_password_of_a_server_list() {
        for (url, described) in [
            (
                "nats://a:very-secret-1@h1:4222,nats://b:very-secret-2@h2:4222",
                "NATS at nats://a:***@h1:4222,nats://b:***@h2:4222",
            ),
            (
                "nats://a:very-secret-1@h1:4222,b:very-secret-2@h2:4222",
                "NATS at nats://a:***@h1:4222,b:***@h2:4222",
            ),
        ] {
            assert_eq!(describe(&nats(url)), described);
        }
    }

    #[tokio::test]
    async fn a_malformed_broker_url_is_a_bad_request() {
        // Refused before any connection attempt, with or without the backend's feature.
        let err = match connect(&nats("nats://a:very-secret@127.0.0.1:1,")).await {
            Ok(_) => panic!("connected with a malformed server list"),
            Err(err) => err,
        };
        assert!(matches!(err, Error::BadRequest(_)), "{err:?}");
        let message = err.to_string();
        assert!(!message.contains("very-secret"), "{message}");
    }

    #[tokio::test]
    async fn a_broker_that_does_not_answer_is_unavailable_not_a_bad_request() {
        // Nothing listens on port 1; without the feature the backend is a bad request instead.
        let mut options = deployd_queue::config::RedisOptions::new("redis://127.0.0.1:1/0");
        options.bounds = deployd_queue::Bounds::default()
            .connect_timeout(std::time::Duration::from_millis(300))
            .publish_timeout(std::time::Duration::from_millis(300));
        let err = match connect(&QueueConfig::Redis(options)).await {
            Ok(_) => panic!("connected to a port nobody listens on"),
            Err(err) => err,
        };
        let message = err.to_string();
        if cfg!(feature = "redis") {
            assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
            assert!(
                message.contains("Redis at redis://127.0.0.1:1/0"),
                "{message}"
            );
        } else {
            assert!(matches!(err, Error::BadRequest(_)), "{err:?}");
            assert!(message.contains("redis"), "{message}");
        }
    }
}
