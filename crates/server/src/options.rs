//! How the API server runs: the names it answers to, the folders clients on other machines may
//! deploy from, and how long `tasks/run` waits.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::auth::{Token, Tokens};

/// How long `POST …/tasks/run` waits for a task by default (llama_deploy's 120 s).
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The settings of the API: see [`crate::router`] and [`crate::serve`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiOptions {
    /// The addresses the server listens on. A request's `Host` must name one of them (a
    /// loopback address also as `localhost`, `127.0.0.1` or `[::1]`), with its port.
    pub listen: Vec<SocketAddr>,
    /// More names requests may be addressed to (`--allow-host`), and the origins of web pages
    /// that may change things (a page's origin must be one of these or a listen address).
    pub allowed_hosts: Vec<AllowedHost>,
    /// Folders clients on other machines may deploy from (`--allow-base-path`); clients on
    /// this machine may use any folder.
    pub allowed_base_paths: Vec<PathBuf>,
    /// How long `POST …/tasks/run` waits for the task before answering 504.
    pub run_timeout: Duration,
    /// The tokens requests must carry; none: an open API (see [`crate::auth`]).
    pub tokens: Tokens,
    /// Origins of web pages that may call the API from a browser (`--cors-origin`): they get
    /// CORS answers, and their pages may change things as pages of `allowed_hosts` may.
    pub cors_origins: Vec<CorsOrigin>,
    /// The largest request body read, in bytes (a larger one is a 413).
    pub max_body_bytes: usize,
    /// The most event streams (a task's events, a followed log) open at once; one more is a
    /// 429.
    pub max_streams: usize,
    /// The largest deployment file taken, in bytes (a larger one is a 413); at most
    /// [`deployd_config::MAX_FILE_SIZE`].
    pub max_file_bytes: usize,
}

/// The largest request body by default: a deployment file's limit and room for the rest of a
/// multipart body.
pub const DEFAULT_MAX_BODY_BYTES: usize = deployd_config::MAX_FILE_SIZE + 64 * 1024;

/// The most event streams open at once by default.
pub const DEFAULT_MAX_STREAMS: usize = 1_000;

impl ApiOptions {
    /// The options of a server listening on `listen`: no other host names, no folders for
    /// remote deploys, a run timeout of [`DEFAULT_RUN_TIMEOUT`].
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen: vec![listen],
            allowed_hosts: Vec::new(),
            allowed_base_paths: Vec::new(),
            run_timeout: DEFAULT_RUN_TIMEOUT,
            tokens: Tokens::default(),
            cors_origins: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_streams: DEFAULT_MAX_STREAMS,
            max_file_bytes: deployd_config::MAX_FILE_SIZE,
        }
    }

    /// Sets the largest deployment file taken (at most [`deployd_config::MAX_FILE_SIZE`]).
    pub fn max_file_bytes(mut self, bytes: usize) -> Self {
        self.max_file_bytes = bytes.min(deployd_config::MAX_FILE_SIZE);
        self
    }

    /// Sets the largest request body read.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets the most event streams open at once.
    pub fn max_streams(mut self, streams: usize) -> Self {
        self.max_streams = streams;
        self
    }

    /// Lets pages of `origin` call the API from a browser (CORS).
    pub fn allow_cors_origin(mut self, origin: CorsOrigin) -> Self {
        self.cors_origins.push(origin);
        self
    }

    /// Whether a request's `Origin` is one of [`ApiOptions::cors_origins`].
    pub(crate) fn cors_allows(&self, origin: &str) -> bool {
        origin
            .parse::<CorsOrigin>()
            .is_ok_and(|origin| self.cors_origins.contains(&origin))
    }

    /// Requires `Authorization: Bearer <token>` on every request but the health check: `full`
    /// may do everything, `task` only run tasks (see [`crate::auth`]).
    pub fn tokens(mut self, full: Option<Token>, task: Option<Token>) -> Self {
        self.tokens = Tokens { full, task };
        self
    }

    /// Also answers requests addressed to `host` (and accepts changes from pages of it).
    pub fn allow_host(mut self, host: AllowedHost) -> Self {
        self.allowed_hosts.push(host);
        self
    }

    /// Lets clients on other machines deploy from `dir` and the folders below it.
    pub fn allow_base_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.allowed_base_paths.push(dir.into());
        self
    }

    /// Sets how long `POST …/tasks/run` waits.
    pub fn run_timeout(mut self, timeout: Duration) -> Self {
        self.run_timeout = timeout;
        self
    }

    /// Whether `host` on `port` is a name this server answers to.
    pub(crate) fn allows(&self, host: &HostName, port: u16) -> bool {
        self.listen
            .iter()
            .any(|address| listen_allows(*address, host, port))
            || self
                .allowed_hosts
                .iter()
                .any(|allowed| allowed.host == *host && allowed.port.is_none_or(|p| p == port))
    }

    /// The names this server answers to, for error messages.
    pub(crate) fn describe_hosts(&self) -> String {
        let mut names = Vec::new();
        for address in &self.listen {
            let port = address.port();
            let ip = address.ip();
            if ip.is_unspecified() {
                names.push(format!("any IP address of this machine with port {port}"));
                names.push(format!("localhost:{port}"));
            } else {
                names.push(HostName::Ip(ip).with_port(port));
                if ip.is_loopback() {
                    for name in [
                        HostName::Name("localhost".to_owned()),
                        HostName::Ip(Ipv4Addr::LOCALHOST.into()),
                        HostName::Ip(Ipv6Addr::LOCALHOST.into()),
                    ] {
                        let name = name.with_port(port);
                        if !names.contains(&name) {
                            names.push(name);
                        }
                    }
                }
            }
        }
        names.extend(self.allowed_hosts.iter().map(ToString::to_string));
        names.join(", ")
    }
}

fn listen_allows(address: SocketAddr, host: &HostName, port: u16) -> bool {
    if port != address.port() {
        return false;
    }
    let ip = address.ip();
    match host {
        HostName::Ip(host) => {
            *host == ip
                || ip.is_unspecified()
                || (ip.is_loopback()
                    && (*host == IpAddr::from(Ipv4Addr::LOCALHOST)
                        || *host == IpAddr::from(Ipv6Addr::LOCALHOST)))
        }
        HostName::Name(name) => (ip.is_loopback() || ip.is_unspecified()) && name == "localhost",
    }
}

/// A host name or an IP address, normalized for comparison (lowercase, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostName {
    Ip(IpAddr),
    Name(String),
}

impl HostName {
    fn parse(text: &str) -> Option<Self> {
        if let Some(inner) = text.strip_prefix('[') {
            return inner
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(|ip| Self::Ip(ip.into()));
        }
        if let Ok(ip) = text.parse::<Ipv4Addr>() {
            return Some(Self::Ip(ip.into()));
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        let valid = !name.is_empty()
            && name.len() <= 253
            && !name.starts_with(['.', '-'])
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        valid.then(|| Self::Name(name.to_ascii_lowercase()))
    }

    fn with_port(&self, port: u16) -> String {
        format!("{self}:{port}")
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// `host[:port]`, as in a `Host` header or an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authority {
    pub(crate) host: HostName,
    pub(crate) port: Option<u16>,
}

impl Authority {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; `None` when it is none of those.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (host, port) = match text.strip_prefix('[') {
            Some(_) => {
                let end = text.find(']')?;
                (&text[..=end], &text[end + 1..])
            }
            None => match text.rfind(':') {
                Some(colon) => (&text[..colon], &text[colon..]),
                None => (text, ""),
            },
        };
        let port = match port {
            "" | ":" => None,
            port => {
                let digits = port.strip_prefix(':')?;
                if !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Some(digits.parse::<u16>().ok()?)
            }
        };
        Some(Self {
            host: HostName::parse(host)?,
            port,
        })
    }
}

/// A name requests may be addressed to, from `--allow-host NAME[:PORT]`: a host name or an
/// IP address (IPv6 in brackets), with a port or, without one, on any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: HostName,
    port: Option<u16>,
}

/// An `--allow-host` value that is not `NAME[:PORT]`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "`{0}` is not a host name or IP address with an optional port (NAME[:PORT], e.g. \
     `deployd.internal`, `deployd.internal:4501` or `[fd00::1]:4501`)"
)]
pub struct InvalidHost(String);

impl FromStr for AllowedHost {
    type Err = InvalidHost;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let authority =
            Authority::parse(text.trim()).ok_or_else(|| InvalidHost(text.to_owned()))?;
        Ok(Self {
            host: authority.host,
            port: authority.port,
        })
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// A web origin, `http://host[:port]` or `https://host[:port]`, from `--cors-origin`; written
/// as browsers send it (lowercase, no default port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsOrigin(String);

/// A `--cors-origin` value that is not an origin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{0}` is not a web origin: {1}")]
pub struct InvalidOrigin(String, &'static str);

impl CorsOrigin {
    /// The origin as browsers send it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CorsOrigin {
    type Err = InvalidOrigin;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |why| InvalidOrigin(text.to_owned(), why);
        let text = text.trim();
        if text == "*" {
            return Err(invalid(
                "a wildcard would let every web page call deployd; name each origin",
            ));
        }
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| invalid("write it as http://host[:port] or https://host[:port]"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(invalid("the scheme must be http or https")),
        };
        if rest.contains(['/', '?', '#', '@']) {
            return Err(invalid(
                "an origin has no path, query or user (http://host[:port])",
            ));
        }
        let authority = Authority::parse(rest).ok_or_else(|| invalid("the host is not valid"))?;
        let host = authority.host.to_string();
        Ok(Self(match authority.port {
            Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
            _ => format!("{scheme}://{host}"),
        }))
    }
}

impl fmt::Display for CorsOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_written_as_browsers_send_them() {
        for (given, written) in [
            ("https://App.Example", "https://app.example"),
            ("https://app.example:443", "https://app.example"),
            ("http://localhost:5173", "http://localhost:5173"),
            ("http://[::1]:3000", "http://[::1]:3000"),
        ] {
            assert_eq!(given.parse::<CorsOrigin>().unwrap().as_str(), written);
        }
        for bad in ["*", "app.example", "ftp://x", "https://x/path", "https://"] {
            assert!(bad.parse::<CorsOrigin>().is_err(), "{bad}");
        }
    }

    fn check(options: &ApiOptions, host: &str, expected: bool) {
        let authority = Authority::parse(host).unwrap_or_else(|| panic!("`{host}` parses"));
        let port = authority.port.unwrap_or(80);
        assert_eq!(options.allows(&authority.host, port), expected, "{host}");
    }

    #[test]
    fn a_loopback_listener_answers_to_its_loopback_names_on_its_port() {
        let options = ApiOptions::new("127.0.0.1:4501".parse().unwrap());
        for host in [
            "127.0.0.1:4501",
            "localhost:4501",
            "LocalHost.:4501",
            "[::1]:4501",
        ] {
            check(&options, host, true);
        }
        for host in [
            "127.0.0.1:4502",
            "localhost",
            "evil.example:4501",
            "127.0.0.2:4501",
            "10.0.0.1:4501",
            "localhost.evil.example:4501",
        ] {
            check(&options, host, false);
        }
    }

    #[test]
    fn allowed_hosts_match_their_port_or_any_port() {
        let options = ApiOptions::new("127.0.0.1:4501".parse().unwrap())
            .allow_host("deployd.internal".parse().unwrap())
            .allow_host("[fd00::1]:8080".parse().unwrap());
        check(&options, "deployd.internal", true);
        check(&options, "DEPLOYD.internal:443", true);
        check(&options, "[fd00::1]:8080", true);
        check(&options, "[fd00::1]:8081", false);
        check(&options, "other.internal", false);
        assert_eq!(
            options.describe_hosts(),
            "127.0.0.1:4501, localhost:4501, [::1]:4501, deployd.internal, [fd00::1]:8080"
        );
    }

    #[test]
    fn an_unspecified_listener_answers_to_ip_addresses_but_not_to_other_names() {
        let options = ApiOptions::new("0.0.0.0:4501".parse().unwrap());
        check(&options, "192.168.1.20:4501", true);
        check(&options, "localhost:4501", true);
        check(&options, "rebind.evil.example:4501", false);
    }

    #[test]
    fn malformed_hosts_do_not_parse() {
        for text in [
            "", "http://x", "x/y", "x:port", "x:99999", "[::1", "[nope]:1", "a b", "x:+1",
        ] {
            assert!(Authority::parse(text).is_none(), "{text:?}");
            assert!(text.parse::<AllowedHost>().is_err(), "{text:?}");
        }
        assert_eq!(
            "Example.COM:8080"
                .parse::<AllowedHost>()
                .unwrap()
                .to_string(),
            "example.com:8080"
        );
    }
}
