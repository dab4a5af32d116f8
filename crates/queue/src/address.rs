//! Broker addresses as a configuration writes them: single URLs (Redis, RabbitMQ, an SQS
//! endpoint) and server lists (NATS, Kafka's bootstrap servers), split and checked by hand so
//! that malformed ones are reported before any connection attempt, and redacted as well as
//! well-formed ones ([`crate::redact`]).
//!
//! The checks here need no backend feature; each backend also runs its client library's own
//! parser before it connects.

use crate::Error;
use crate::redact::redact_url;

/// The parts of one URL or server-list entry, split as a URL parser splits it: the scheme ends
/// at `://`, the authority at the first `/`, `?` or `#`, and the user info at the last `@` of
/// the authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// Without `://`; `None` for `host:port`.
    pub(crate) scheme: Option<&'a str>,
    /// Without the `@`.
    pub(crate) userinfo: Option<&'a str>,
    /// As written: percent-encoded, an IPv6 address with its brackets.
    pub(crate) host: &'a str,
    /// What follows the host's `:`, if there is one.
    pub(crate) port: Option<&'a str>,
    /// From its `/`, empty when there is none.
    pub(crate) path: &'a str,
    /// Without the `?`.
    pub(crate) query: Option<&'a str>,
}

impl<'a> Parts<'a> {
    pub(crate) fn split(text: &'a str) -> Self {
        let (scheme, rest) = split_scheme(text);
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(authority_end);
        let (userinfo, host_port) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port);
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        Self {
            scheme,
            userinfo: userinfo.filter(|info| !info.is_empty()),
            host,
            port,
            path,
            query,
        }
    }

    /// The scheme in lower case.
    pub(crate) fn scheme_lowercase(&self) -> Option<String> {
        self.scheme.map(str::to_ascii_lowercase)
    }

    /// The user name and the password, percent-decoded.
    pub(crate) fn credentials(&self) -> Option<(String, Option<String>)> {
        let info = self.userinfo?;
        Some(match info.split_once(':') {
            Some((user, password)) => (percent_decode(user), Some(percent_decode(password))),
            None => (percent_decode(info), None),
        })
    }

    /// The host, percent-decoded and without the brackets of an IPv6 address.
    #[cfg_attr(not(feature = "rabbitmq"), allow(dead_code))]
    pub(crate) fn host_name(&self) -> String {
        let host = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(self.host);
        percent_decode(host)
    }

    /// What is wrong with the host and the port, if anything.
    pub(crate) fn host_port_problem(&self) -> Option<String> {
        if self.host.is_empty() {
            return Some("the host is missing".into());
        }
        if let Some(inner) = self.host.strip_prefix('[') {
            let address = inner.strip_suffix(']').unwrap_or(inner);
            let address = address.split_once('%').map_or(address, |(a, _)| a);
            if !inner.ends_with(']') || address.parse::<std::net::Ipv6Addr>().is_err() {
                return Some("the host is not a valid IPv6 address in brackets".into());
            }
        } else if !self
            .host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '%' | '~'))
        {
            return Some("the host holds characters a host name cannot hold".into());
        }
        match self.port {
            None | Some("") => None,
            Some(port) => match port.parse::<u16>() {
                Ok(number) if number > 0 && port.bytes().all(|b| b.is_ascii_digit()) => None,
                _ => Some("the port is not a number from 1 to 65535".into()),
            },
        }
    }
}

/// `scheme://` and the rest; no scheme when what precedes `://` cannot be one.
pub(crate) fn split_scheme(text: &str) -> (Option<&str>, &str) {
    match text.split_once("://") {
        Some((scheme, rest)) if is_scheme(scheme) => (Some(scheme), rest),
        _ => (None, text),
    }
}

/// RFC 3986's scheme, plus `_` for librdkafka's `SASL_SSL://`.
fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'))
}

fn split_host_port(host_port: &str) -> (&str, Option<&str>) {
    if host_port.starts_with('[') {
        return match host_port.find(']') {
            Some(end) => {
                let (host, rest) = host_port.split_at(end + 1);
                match rest.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    // Anything else after the brackets fails the port check.
                    None if !rest.is_empty() => (host, Some(rest)),
                    None => (host, None),
                }
            }
            None => (host_port, None),
        };
    }
    match host_port.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host_port, None),
    }
}

/// `text` with `%XX` escapes decoded; anything else, including a malformed escape, as it is.
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(i + 1).and_then(|b| char::from(*b).to_digit(16)),
                bytes.get(i + 2).and_then(|b| char::from(*b).to_digit(16)),
            )
        {
            // Two hex digits: at most 255.
            out.push(u8::try_from(high * 16 + low).unwrap_or(b'%'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// [`Error::InvalidConfig`] for `problem` in `url`, which is quoted redacted.
pub(crate) fn invalid(what: &str, url: &str, problem: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("{what} `{}`: {problem}", redact_url(url)))
}

/// The entries of a comma-separated list, trimmed.
fn list_entries(list: &str) -> impl Iterator<Item = (usize, &str)> {
    list.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, entry)| (i + 1, entry))
}

/// Checks a Redis URL: `redis[s]://[user:password@]host[:port][/db]`, or a Unix socket.
pub(crate) fn check_redis_url(url: &str) -> Result<(), Error> {
    const WHAT: &str = "Redis URL";
    let trimmed = url.trim();
    let parts = Parts::split(trimmed);
    match parts.scheme_lowercase().as_deref() {
        None => Err(invalid(
            WHAT,
            url,
            "the scheme is missing: write redis://host:port/db",
        )),
        Some("redis" | "rediss" | "valkey" | "valkeys") => {
            if let Some(problem) = parts.host_port_problem() {
                return Err(invalid(WHAT, url, problem));
            }
            match parts.path.trim_matches('/') {
                "" => Ok(()),
                db if db.parse::<u32>().is_ok() => Ok(()),
                _ => Err(invalid(
                    WHAT,
                    url,
                    "the path is not a database number (redis://host:port/0)",
                )),
            }
        }
        Some("unix" | "redis+unix" | "valkey+unix") => {
            if parts.path.is_empty() {
                Err(invalid(WHAT, url, "the path of the socket is missing"))
            } else {
                Ok(())
            }
        }
        Some(other) => Err(invalid(
            WHAT,
            url,
            format!("unknown scheme `{other}`: use redis:// or rediss://"),
        )),
    }
}

/// Checks a RabbitMQ URL: `amqp[s]://[user:password@]host[:port][/vhost]`.
pub(crate) fn check_amqp_url(url: &str) -> Result<(), Error> {
    const WHAT: &str = "RabbitMQ URL";
    let parts = Parts::split(url.trim());
    match parts.scheme_lowercase().as_deref() {
        None => Err(invalid(
            WHAT,
            url,
            "the scheme is missing: write amqp://user:password@host:port/vhost",
        )),
        Some("amqp" | "amqps") => match parts.host_port_problem() {
            Some(problem) => Err(invalid(WHAT, url, problem)),
            None => Ok(()),
        },
        Some(other) => Err(invalid(
            WHAT,
            url,
            format!("unknown scheme `{other}`: use amqp:// or amqps://"),
        )),
    }
}

/// The virtual host a RabbitMQ URL names, as llama_deploy's client (aio-pika, on yarl) reads
/// it: no path, or a lone `/`, is the default vhost `/`; otherwise the path without its first
/// `/`, percent-decoded (`/%2f` is `/`, `/other` is `other`).
#[cfg_attr(not(feature = "rabbitmq"), allow(dead_code))]
pub(crate) fn amqp_vhost(url: &str) -> String {
    match Parts::split(url.trim()).path {
        "" | "/" => "/".to_owned(),
        path => percent_decode(&path[1..]),
    }
}

/// How a client authenticates to NATS, from the user info of a server list's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NatsAuth {
    /// No entry has user info.
    None,
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@`: a user name alone is a token, as in NATS's other clients.
    Token(String),
}

/// The entries of a NATS server list (`nats://[user:password@]host[:port]`, comma-separated,
/// the scheme optional) and the one set of credentials they carry.
///
/// async-nats authenticates with one set of credentials for every server, so entries with user
/// info must agree; entries without take theirs.
pub(crate) fn nats_servers(url: &str) -> Result<(Vec<&str>, NatsAuth), Error> {
    const WHAT: &str = "NATS server list";
    let mut entries = Vec::new();
    let mut auth: Option<(usize, (String, Option<String>))> = None;
    for (number, entry) in list_entries(url) {
        if entry.is_empty() {
            return Err(invalid(WHAT, url, format!("entry {number} is empty")));
        }
        let parts = Parts::split(entry);
        match parts.scheme_lowercase().as_deref() {
            None | Some("nats" | "tls") => {}
            Some("ws" | "wss") => {
                return Err(invalid(
                    WHAT,
                    url,
                    format!(
                        "entry {number}: websocket URLs are not supported; use nats:// or tls://"
                    ),
                ));
            }
            Some(other) => {
                return Err(invalid(
                    WHAT,
                    url,
                    format!("entry {number}: unknown scheme `{other}`; use nats:// or tls://"),
                ));
            }
        }
        if let Some(problem) = parts.host_port_problem() {
            return Err(invalid(WHAT, url, format!("entry {number}: {problem}")));
        }
        if let Some(credentials) = parts.credentials() {
            match &auth {
                Some((first, seen)) if *seen != credentials => {
                    return Err(invalid(
                        WHAT,
                        url,
                        format!(
                            "entries {first} and {number} carry different credentials; the \
                             client authenticates to every server of a list with the same ones"
                        ),
                    ));
                }
                Some(_) => {}
                None => auth = Some((number, credentials)),
            }
        }
        entries.push(entry);
    }
    let auth = match auth {
        None => NatsAuth::None,
        Some((_, (user, Some(password)))) => NatsAuth::UserPassword(user, password),
        Some((_, (token, None))) => NatsAuth::Token(token),
    };
    Ok((entries, auth))
}

/// Checks Kafka's bootstrap servers: `host:port[,host:port...]`, each optionally behind
/// librdkafka's `PLAINTEXT://`, `SSL://`, `SASL_PLAINTEXT://` or `SASL_SSL://`.
pub(crate) fn check_kafka_brokers(brokers: &str) -> Result<(), Error> {
    const WHAT: &str = "Kafka bootstrap servers";
    if brokers.trim().is_empty() {
        return Err(invalid(WHAT, brokers, "no server is given"));
    }
    for (number, entry) in list_entries(brokers) {
        if entry.is_empty() {
            return Err(invalid(WHAT, brokers, format!("entry {number} is empty")));
        }
        let parts = Parts::split(entry);
        match parts.scheme_lowercase().as_deref() {
            None | Some("plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl") => {}
            Some(other) => {
                return Err(invalid(
                    WHAT,
                    brokers,
                    format!("entry {number}: unknown protocol `{other}`"),
                ));
            }
        }
        if parts.userinfo.is_some() || entry.contains('@') {
            return Err(invalid(
                WHAT,
                brokers,
                format!(
                    "entry {number}: credentials do not go in the bootstrap servers; set \
                     `sasl.username` and `sasl.password` in the extra settings"
                ),
            ));
        }
        if let Some(problem) = parts.host_port_problem() {
            return Err(invalid(WHAT, brokers, format!("entry {number}: {problem}")));
        }
        if !parts.path.is_empty() || parts.query.is_some() {
            return Err(invalid(
                WHAT,
                brokers,
                format!("entry {number}: a bootstrap server is `host:port`, without a path"),
            ));
        }
    }
    Ok(())
}

/// Checks an HTTP endpoint (SQS's): `http[s]://host[:port][/path]`. Requests are signed
/// with the access keys, so user info or a query string would only end up in the SDK's logs.
pub(crate) fn check_http_endpoint(endpoint: &str) -> Result<(), Error> {
    const WHAT: &str = "SQS endpoint";
    let parts = Parts::split(endpoint.trim());
    match parts.scheme_lowercase().as_deref() {
        Some("http" | "https") => {
            if parts.userinfo.is_some() || parts.query.is_some() || endpoint.contains('@') {
                return Err(invalid(
                    WHAT,
                    endpoint,
                    "credentials do not go in the endpoint; set the access key id and the \
                     secret access key",
                ));
            }
            match parts.host_port_problem() {
                Some(problem) => Err(invalid(WHAT, endpoint, problem)),
                None => Ok(()),
            }
        }
        None => Err(invalid(
            WHAT,
            endpoint,
            "the scheme is missing: write http://host:port or https://host",
        )),
        Some(other) => Err(invalid(
            WHAT,
            endpoint,
            format!("unknown scheme `{other}`: use http:// or https://"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_urls() {
        let parts = Parts::split("amqp://u:p%40ss@[::1]:5672/v%2fh?heartbeat=10#x");
        assert_eq!(parts.scheme, Some("amqp"));
        assert_eq!(parts.userinfo, Some("u:p%40ss"));
        assert_eq!(parts.host, "[::1]");
        assert_eq!(parts.host_name(), "::1");
        assert_eq!(parts.port, Some("5672"));
        assert_eq!(parts.path, "/v%2fh");
        assert_eq!(parts.query, Some("heartbeat=10"));
        assert_eq!(
            parts.credentials(),
            Some(("u".to_owned(), Some("p@ss".to_owned())))
        );
        let parts = Parts::split("a:pw@h2:4222");
        assert_eq!(parts.scheme, None);
        assert_eq!(parts.userinfo, Some("a:pw"));
        assert_eq!((parts.host, parts.port), ("h2", Some("4222")));
        assert_eq!(
            Parts::split("amqp://").host_port_problem().as_deref(),
            Some("the host is missing")
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("p%40ss%2F%2f"), "p@ss//");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%+1%zz%4"), "%+1%zz%4");
        assert_eq!(percent_decode(&percent_encode("a b/ü@")), "a b/ü@");
    }

    /// `check(url)` fails with [`Error::InvalidConfig`] whose message holds `expected`.
    fn refused(result: Result<(), Error>, expected: &str) {
        match result {
            Err(Error::InvalidConfig(message)) => {
                assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            }
            other => panic!("expected an invalid configuration ({expected}), got {other:?}"),
        }
    }

    #[test]
    fn malformed_redis_urls() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://:p%40ss@h:6380/2",
            "rediss://u:p@h",
            "redis://h/",
            "redis://[::1]:6379",
            "unix:///run/redis.sock",
        ] {
            assert!(check_redis_url(url).is_ok(), "{url}");
        }
        let port = "the port is not a number from 1 to 65535";
        refused(check_redis_url("redis://h:notaport"), port);
        refused(
            check_redis_url("redis://h:notaport"),
            "`redis://h:notaport`",
        );
        refused(check_redis_url("redis://h:99999/0"), port);
        refused(check_redis_url("redis://h:0/0"), port);
        refused(check_redis_url("redis://"), "the host is missing");
        refused(check_redis_url("redis://:pw@/0"), "the host is missing");
        refused(check_redis_url("redis://h/db"), "database number");
        refused(check_redis_url("h:6379"), "the scheme is missing");
        refused(check_redis_url("http://h:6379"), "unknown scheme `http`");
        refused(check_redis_url("redis://h h:6379"), "characters");
        refused(check_redis_url("redis://[::zz]:6379"), "IPv6");
    }

    #[test]
    fn malformed_amqp_urls() {
        for url in [
            "amqp://guest:guest@localhost/",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqps://u:p@h/other",
            "amqp://h",
        ] {
            assert!(check_amqp_url(url).is_ok(), "{url}");
        }
        refused(check_amqp_url("amqp://"), "the host is missing");
        refused(
            check_amqp_url("amqp://h:99999"),
            "the port is not a number from 1 to 65535",
        );
        refused(check_amqp_url("amqp://u:secret@h:x/"), "amqp://u:***@h:x/");
        refused(check_amqp_url("rabbitmq://h"), "unknown scheme `rabbitmq`");
        refused(check_amqp_url("localhost:5672"), "the scheme is missing");
    }

    #[test]
    fn vhosts_as_llama_deploy_reads_them() {
        for (url, vhost) in [
            ("amqp://guest:guest@localhost/", "/"),
            ("amqp://guest:guest@localhost", "/"),
            ("amqp://guest:guest@localhost:5672", "/"),
            ("amqp://guest:guest@localhost:5672/%2f", "/"),
            ("amqp://guest:guest@localhost:5672/%2F", "/"),
            ("amqp://h/other", "other"),
            ("amqp://h/prod%2Feu", "prod/eu"),
            ("amqp://h/?heartbeat=10", "/"),
            ("amqp://h/other?heartbeat=10", "other"),
        ] {
            assert_eq!(amqp_vhost(url), vhost, "{url}");
        }
    }

    #[test]
    fn nats_server_lists() {
        let (entries, auth) =
            nats_servers("nats://127.0.0.1:1, nats://127.0.0.1:4222").expect("a valid list");
        assert_eq!(entries, ["nats://127.0.0.1:1", "nats://127.0.0.1:4222"]);
        assert_eq!(auth, NatsAuth::None);
        let (entries, auth) =
            nats_servers("nats://a:p%40w@h1:4222,a:p%40w@h2:4222,h3").expect("a valid list");
        assert_eq!(entries.len(), 3);
        assert_eq!(auth, NatsAuth::UserPassword("a".into(), "p@w".into()));
        let (_, auth) = nats_servers("tls://s3cr3t@h1,h2:4222").expect("a valid list");
        assert_eq!(auth, NatsAuth::Token("s3cr3t".into()));

        let refuse = |url: &str, expected: &str| refused(nats_servers(url).map(|_| ()), expected);
        refuse("nats://h1:4222,", "entry 2 is empty");
        refuse("nats://h1:4222,,nats://h2:4222", "entry 2 is empty");
        refuse("", "entry 1 is empty");
        refuse("nats://h1:4222,nats://h2:port", "entry 2: the port is not");
        refuse(
            "nats://h1:4222,nats://:4222",
            "entry 2: the host is missing",
        );
        refuse("nats://h1,http://h2", "entry 2: unknown scheme `http`");
        refuse("ws://h1:8080", "websocket");
        refuse(
            "nats://a:pw1@h1:4222,nats://b:pw2@h2:4222",
            "entries 1 and 2 carry different credentials",
        );
        refuse(
            "nats://a:pw1@h1:4222,nats://b:pw2@h2:4222",
            "`nats://a:***@h1:4222,nats://b:***@h2:4222`",
        );
    }

    #[test]
    fn kafka_bootstrap_servers() {
        for brokers in [
            "127.0.0.1:9092",
            "h1:9092,h2:9092",
            "h1, h2:9093",
            "SASL_SSL://h1:9093,[::1]:9092",
        ] {
            assert!(check_kafka_brokers(brokers).is_ok(), "{brokers}");
        }
        refused(check_kafka_brokers(""), "no server is given");
        refused(check_kafka_brokers("h1:9092,"), "entry 2 is empty");
        refused(
            check_kafka_brokers("h1:9092,h2:x"),
            "entry 2: the port is not",
        );
        refused(check_kafka_brokers("h1:99999"), "the port is not");
        refused(check_kafka_brokers("h1:9092:1"), "the port is not");
        refused(check_kafka_brokers("http://h1:9092"), "unknown protocol");
        refused(check_kafka_brokers("h1:9092/x"), "without a path");
        refused(
            check_kafka_brokers("u:very-secret@h1:9092"),
            "credentials do not go in the bootstrap servers",
        );
        refused(
            check_kafka_brokers("u:very-secret@h1:9092"),
            "`u:***@h1:9092`",
        );
    }

    #[test]
    fn http_endpoints() {
        assert!(check_http_endpoint("http://127.0.0.1:5000").is_ok());
        assert!(check_http_endpoint("https://sqs.us-east-1.amazonaws.com").is_ok());
        refused(
            check_http_endpoint("127.0.0.1:5000"),
            "the scheme is missing",
        );
        refused(check_http_endpoint("ftp://h"), "unknown scheme `ftp`");
        refused(check_http_endpoint("http://h:70000"), "the port is not");
        let credentials = "credentials do not go in the endpoint";
        refused(check_http_endpoint("http://u:pw@h:5000"), credentials);
        refused(
            check_http_endpoint("http://u:pw@h:5000"),
            "`http://u:***@h:5000`",
        );
        refused(check_http_endpoint("https://h/?token=t"), credentials);
    }
}
