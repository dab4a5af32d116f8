//! Keeping credentials out of what deployd-queue shows: [`redact_url`] for a broker URL or a
//! server list (Debug output, [`QueueConfig::describe`], the messages the backends build), and
//! [`Secrets`], every secret of a configuration, for the error texts and log lines of client
//! libraries, which may quote a URL or a setting.

use crate::Error;
use crate::address::{Parts, percent_decode, split_scheme};
use crate::config::{KafkaOptions, QueueConfig, SqsOptions};

const MASK: &str = "***";

/// `url` with every credential replaced by `***`, for messages and logs.
///
/// It takes what a configuration holds, well-formed or not:
/// - a single URL, whose password (`user:password@`, or `:password@`) is replaced and whose
///   user name stays; a user name alone (`token@`) is a token and replaced too, except in
///   Redis and AMQP URLs, where it is a user name;
/// - a comma-separated server list (NATS's `nats://a:pw@h1:4222,nats://b:pw2@h2:4222`, Kafka's
///   `h1:9092,h2:9092`), entries with or without a scheme (`a:pw@h2:4222`), each redacted;
/// - query parameters whose name holds `pass`, `pwd`, `secret`, `token`, `key`, `auth` or
///   `cred` in any case (`?password=`, `?auth_token=`, `?sasl.password=`), whose values are
///   replaced.
///
/// Redis, AMQP and HTTP URLs are never split at commas, so a comma in their password does not
/// uncover the rest of it. What a URL parser would take for the user info is hidden even when
/// the URL is malformed (a password with an unencoded `/`, `?` or `#`).
///
/// ```
/// use deployd_queue::redact_url;
///
/// assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
/// assert_eq!(
///     redact_url("nats://a:pw@h1:4222,b:pw2@h2:4222"),
///     "nats://a:***@h1:4222,b:***@h2:4222"
/// );
/// assert_eq!(
///     redact_url("amqp://h/?heartbeat=10&password=pw"),
///     "amqp://h/?heartbeat=10&password=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    entries(url)
        .into_iter()
        .map(redact_entry)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a setting or query parameter named `key` holds a secret: its name holds `pass`,
/// `pwd`, `secret`, `token`, `key`, `auth` or `cred` in any case, or it is one of librdkafka's
/// `sasl.oauthbearer.*` or `sasl.jaas.*` settings.
pub(crate) fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "key", "auth", "cred"]
        .iter()
        .any(|word| key.contains(word))
        || key.starts_with("sasl.oauthbearer.")
        || key.starts_with("sasl.jaas")
}

/// Schemes whose URL names one server, never a list, and whose lone user name is a user name.
fn names_user(scheme: &str) -> bool {
    matches!(
        scheme.to_ascii_lowercase().as_str(),
        "redis"
            | "rediss"
            | "valkey"
            | "valkeys"
            | "redis+unix"
            | "valkey+unix"
            | "unix"
            | "amqp"
            | "amqps"
    )
}

/// Schemes whose URL names one server, never a list.
fn is_single(url: &str) -> bool {
    let (scheme, _) = split_scheme(url.trim_start());
    scheme.is_some_and(|scheme| {
        names_user(scheme) || matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
    })
}

/// The entries of `url`: itself for a single URL, its comma-separated pieces for a list,
/// where a piece that cannot end an entry (`nats://user:pa` of `nats://user:pa,ss@host`: no
/// `@` yet, no valid host and port) is joined with the next one unless that one starts with
/// a scheme.
fn entries(url: &str) -> Vec<&str> {
    if is_single(url) {
        return vec![url];
    }
    let mut entries = Vec::new();
    let mut start = 0;
    for (comma, _) in url.match_indices(',') {
        let piece = &url[start..comma];
        let next = url[comma + 1..].split(',').next().unwrap_or("");
        if is_partial(piece) && split_scheme(next.trim_start()).0.is_none() {
            continue;
        }
        entries.push(piece);
        start = comma + 1;
    }
    entries.push(&url[start..]);
    entries
}

fn is_partial(piece: &str) -> bool {
    let piece = piece.trim();
    let (_, rest) = split_scheme(piece);
    !rest.is_empty() && !rest.contains('@') && Parts::split(piece).host_port_problem().is_some()
}

fn redact_entry(entry: &str) -> String {
    let body = entry.trim_start();
    let mut out = String::with_capacity(entry.len());
    out.push_str(&entry[..entry.len() - body.len()]);
    let (scheme, rest) = split_scheme(body);
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    // The user info ends at the last `@`: a password with an unencoded `/` stays hidden.
    let rest = match rest.rfind('@') {
        Some(at) => {
            let info = &rest[..at];
            match info.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                None if info.is_empty() || scheme.is_some_and(names_user) => out.push_str(info),
                None => out.push_str(MASK),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    out.push_str(rest);
    redact_params(&out)
}

/// `text` with the value of every secret-looking `key=value` that follows a `?`, `&` or `;`
/// replaced.
fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(delimiter) = rest.find(['?', '&', ';']) {
        out.push_str(&rest[..=delimiter]);
        rest = &rest[delimiter + 1..];
        let end = rest.find(['&', '#']).unwrap_or(rest.len());
        if let Some((key, _)) = rest[..end].split_once('=')
            && is_secret_key(&percent_decode(key))
        {
            out.push_str(key);
            out.push('=');
            out.push_str(MASK);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// The secret-looking values of the query parameters in `text`.
fn param_secrets(text: &str) -> impl Iterator<Item = &str> {
    text.split(['?', '&', ';']).skip(1).filter_map(|param| {
        let param = param.split('#').next().unwrap_or(param);
        let (key, value) = param.split_once('=')?;
        is_secret_key(&percent_decode(key)).then_some(value)
    })
}

/// Every URL in `text` (a `scheme://` and what follows up to a space or a quote) redacted.
fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        let start = rest[..found]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'))
            .last()
            .map_or(found, |(i, _)| i);
        let after = found + 3;
        let end = rest[after..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map_or(rest.len(), |i| after + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets of a configuration, to be replaced in text that may quote them: the errors
/// and log lines of client libraries, which may repeat a URL or a setting's value.
#[derive(Clone, Default)]
pub(crate) struct Secrets(Vec<String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} hidden)", self.0.len())
    }
}

impl Secrets {
    /// The secrets of `config`: passwords and tokens of its URLs, secret query parameters,
    /// Kafka's secret settings, SQS's keys.
    pub(crate) fn of(config: &QueueConfig) -> Self {
        match config {
            QueueConfig::Memory => Self::default(),
            QueueConfig::Redis(options) => Self::of_url(&options.url),
            QueueConfig::RabbitMq(options) => Self::of_url(&options.url),
            QueueConfig::Nats(options) => Self::of_url(&options.url),
            QueueConfig::Kafka(options) => Self::of_kafka(options),
            QueueConfig::Sqs(options) => Self::of_sqs(options),
        }
    }

    /// The secrets of a URL or a server list.
    pub(crate) fn of_url(url: &str) -> Self {
        let mut secrets = Self::default();
        secrets.add_url(url);
        secrets
    }

    pub(crate) fn of_kafka(options: &KafkaOptions) -> Self {
        let mut secrets = Self::of_url(&options.brokers);
        for (key, value) in &options.extra {
            if is_secret_key(key) {
                secrets.add(value);
            }
        }
        secrets
    }

    pub(crate) fn of_sqs(options: &SqsOptions) -> Self {
        let mut secrets = Self::default();
        if let Some(endpoint) = &options.endpoint {
            secrets.add_url(endpoint);
        }
        for secret in [&options.secret_access_key, &options.session_token]
            .into_iter()
            .flatten()
        {
            secrets.add(secret);
        }
        secrets
    }

    /// Adds `secret`, and its percent-decoded form.
    pub(crate) fn add(&mut self, secret: &str) {
        for secret in [secret.to_owned(), percent_decode(secret)] {
            if !secret.trim_matches('*').is_empty() && !self.0.contains(&secret) {
                self.0.push(secret);
            }
        }
        // The longest first, so that a secret holding another is replaced whole.
        self.0.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    }

    /// Adds the passwords, tokens and secret query parameters of `url`, as [`redact_url`]
    /// reads its entries and as a URL parser does.
    pub(crate) fn add_url(&mut self, url: &str) {
        let mut pieces = entries(url);
        if !is_single(url) {
            pieces.extend(url.split(','));
        }
        for piece in pieces {
            let piece = piece.trim();
            let (scheme, rest) = split_scheme(piece);
            let loose = rest.rfind('@').map(|at| &rest[..at]);
            let strict = Parts::split(piece).userinfo;
            for info in [loose, strict].into_iter().flatten() {
                match info.split_once(':') {
                    Some((_, password)) => self.add(password),
                    None if !scheme.is_some_and(names_user) => self.add(info),
                    None => {}
                }
            }
            for value in param_secrets(piece) {
                self.add(value);
            }
        }
    }

    /// `text` with every URL redacted and every secret replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = redact_urls_in(text);
        for secret in &self.0 {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        out
    }

    /// `err` with its message scrubbed.
    pub(crate) fn scrub_error(&self, err: Error) -> Error {
        match err {
            Error::Unavailable(message) => Error::Unavailable(self.scrub(&message)),
            Error::Backend(message) => Error::Backend(self.scrub(&message)),
            Error::InvalidConfig(message) => Error::InvalidConfig(self.scrub(&message)),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: &str) {
        assert_eq!(redact_url(url), expected, "redact_url({url:?})");
    }

    #[test]
    fn single_urls() {
        check("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0");
        check("redis://u:pw@h:6379/0", "redis://u:***@h:6379/0");
        check("redis://:pw@h", "redis://:***@h");
        check(
            "rediss://default:p%40ss@h:6380/2",
            "rediss://default:***@h:6380/2",
        );
        check("redis://user@h:6379", "redis://user@h:6379");
        check(
            "amqp://guest:guest@localhost/",
            "amqp://guest:***@localhost/",
        );
        check("amqps://u:pw@h:5671/%2f", "amqps://u:***@h:5671/%2f");
        check("http://token@h:5000", "http://***@h:5000");
        check("nats://s3cr3t@h:4222", "nats://***@h:4222");
        check("tls://u:pw@h:4222", "tls://u:***@h:4222");
        // Malformed: the password holds what ends an authority, or a comma.
        check("redis://:pa/ss@h:6379/0", "redis://:***@h:6379/0");
        check("redis://u:pa?ss@h", "redis://u:***@h");
        check("redis://u:pa,ss@h:6379", "redis://u:***@h:6379");
        check("redis://u:12,34@h:6379", "redis://u:***@h:6379");
        check("amqp://u:p#w@h/", "amqp://u:***@h/");
        check("redis://h:notaport", "redis://h:notaport");
        check("", "");
    }

    #[test]
    fn server_lists() {
        check(
            "nats://a:pw@h1:4222,nats://b:pw2@h2:4222",
            "nats://a:***@h1:4222,nats://b:***@h2:4222",
        );
        check(
            "nats://a:pw@h1:4222, b:pw2@h2:4222",
            "nats://a:***@h1:4222, b:***@h2:4222",
        );
        check(
            "nats://h1:4222,tok@h2:4222,:pw@h3",
            "nats://h1:4222,***@h2:4222,:***@h3",
        );
        check("nats://u:pa,ss@h1:4222", "nats://u:***@h1:4222");
        check(
            "nats://h1:bad,nats://u:pw@h2",
            "nats://h1:bad,nats://u:***@h2",
        );
        check("h1:9092,h2:9092", "h1:9092,h2:9092");
        check("u:pw@h1:9092,h2:9092", "u:***@h1:9092,h2:9092");
        check("nats://h1:4222,,", "nats://h1:4222,,");
    }

    #[test]
    fn query_parameters() {
        check(
            "redis://h:6379/0?password=pw&protocol=resp3",
            "redis://h:6379/0?password=***&protocol=resp3",
        );
        check(
            "amqp://h/?heartbeat=10&Auth_Token=t0k#x",
            "amqp://h/?heartbeat=10&Auth_Token=***#x",
        );
        check(
            "nats://h1?token=a,nats://h2?SECRET=b",
            "nats://h1?token=***,nats://h2?SECRET=***",
        );
        // A value runs to the next `&`: a `;` may belong to a password.
        check(
            "h:9092?sasl.password=p;w&x=1",
            "h:9092?sasl.password=***&x=1",
        );
        check("h:9092?x=1;access_key=k", "h:9092?x=1;access_key=***");
        check(
            "https://sqs?api%5Fkey=k&region=x",
            "https://sqs?api%5Fkey=***&region=x",
        );
        check("redis://h?passwd", "redis://h?passwd");
    }

    #[test]
    fn secret_keys() {
        for key in [
            "password",
            "sasl.password",
            "ssl.key.password",
            "SASL.OAUTHBEARER.CLIENT.SECRET",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.extensions",
            "access_key",
            "token",
            "auth_token",
            "pwd",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "security.protocol",
            "sasl.username",
            "sasl.mechanisms",
            "heartbeat",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn text_is_scrubbed_of_urls_and_secrets() {
        let secrets = Secrets::of_url("nats://a:p%40ss@h1:4222,b:second@h2:4222?token=t0ken");
        let text = "cannot connect to \"nats://x:other@h9:4222\": denied for p@ss, p%40ss, \
                    second and t0ken";
        let scrubbed = secrets.scrub(text);
        assert_eq!(
            scrubbed,
            "cannot connect to \"nats://x:***@h9:4222\": denied for ***, ***, *** and ***"
        );
        // Nothing to hide: the text is unchanged.
        assert_eq!(Secrets::default().scrub("redis: refused"), "redis: refused");
        // A secret that holds another is replaced whole.
        let mut secrets = Secrets::default();
        secrets.add("pw");
        secrets.add("pw-long");
        assert_eq!(secrets.scrub("pw-long pw"), "*** ***");
        assert_eq!(format!("{secrets:?}"), "Secrets(2 hidden)");
    }

    #[test]
    fn secrets_of_a_malformed_url() {
        let secrets = Secrets::of_url("redis://u:pa/ss@h");
        assert_eq!(secrets.scrub("pa/ss"), "***");
        let secrets = Secrets::of_url("nats://u:pa,ss@h");
        assert_eq!(secrets.scrub("pa,ss"), "***");
    }
}
