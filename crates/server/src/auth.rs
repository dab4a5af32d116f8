//! Who may call the API: bearer tokens with two scopes.
//!
//! - the **full** token (`--token`, `DEPLOYD_TOKEN`) may do everything;
//! - the **task** token (`--task-token`, `DEPLOYD_TASK_TOKEN`) may read deployments and run
//!   tasks (create, run, events, results, sessions), but not create, reload or delete a
//!   deployment: a frontend can hold it without being able to run code of its choosing.
//!
//! With no token configured the API is open (deployd then listens on loopback only, unless the
//! operator says `--insecure-no-auth`). With one, every request but `GET /status/` needs
//! `Authorization: Bearer <token>`: none or a wrong one is a 401, a task token on a route that
//! changes deployments a 403. `GET /status/` answers health to anyone, and the deployments only
//! to a caller with a token. Tokens are compared in time that depends only on the token
//! configured, not on how much of it a guess got right.

use std::fmt;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The shortest token accepted: a token is a secret, not a password to remember.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token the server accepts. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// A token, refused when shorter than [`MIN_TOKEN_LEN`] bytes or when it holds whitespace
    /// or control characters (it would not survive a header).
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(InvalidToken(format!(
                "is {} characters long; use at least {MIN_TOKEN_LEN} (for example the output of \
                 `openssl rand -hex 32`)",
                token.len()
            )));
        }
        if token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            return Err(InvalidToken(
                "holds spaces, control or non-ASCII characters; use printable ASCII".to_owned(),
            ));
        }
        Ok(Self(token.as_bytes().to_vec()))
    }

    /// Whether `given` is this token, in time that depends on this token's length only.
    fn matches(&self, given: &[u8]) -> bool {
        let mut diff = self.0.len() ^ given.len();
        for (i, byte) in self.0.iter().enumerate() {
            diff |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
        }
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(…)")
    }
}

/// Why a token is refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the token {0}")]
pub struct InvalidToken(String);

/// The tokens of a server; none means an open API.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub(crate) full: Option<Token>,
    pub(crate) task: Option<Token>,
}

impl Tokens {
    /// Whether requests must carry a token.
    pub fn required(&self) -> bool {
        self.full.is_some() || self.task.is_some()
    }
}

/// What a request may do, as the guard found it; routes read it from the request's
/// extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// No token configured, or the full token.
    Full,
    /// The task token.
    Tasks,
    /// Tokens are required and the request has none that is right (only `GET /status/` gets
    /// this far).
    Anonymous,
}

/// The access `headers` give, or the 401 that refuses them.
pub(crate) fn access(tokens: &Tokens, headers: &HeaderMap) -> Result<Access, Refused> {
    if !tokens.required() {
        return Ok(Access::Full);
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Refused::Unauthorized(
            "this deployd needs a token: send `Authorization: Bearer <token>` (the deployd CLI \
             sends DEPLOYD_TOKEN)",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or(Refused::Unauthorized(
            "the Authorization header must be `Bearer <token>`",
        ))?;
    // Both compared, whatever the first gives: the time does not tell which one matched.
    let full = tokens
        .full
        .as_ref()
        .is_some_and(|t| t.matches(given.as_bytes()));
    let task = tokens
        .task
        .as_ref()
        .is_some_and(|t| t.matches(given.as_bytes()));
    if full {
        Ok(Access::Full)
    } else if task {
        Ok(Access::Tasks)
    } else {
        Err(Refused::Unauthorized(
            "the token is not valid for this deployd",
        ))
    }
}

/// Whether the task token may make a request: reading the server's status (not its metrics)
/// and its deployments, and
/// everything under a deployment's `tasks` and `sessions`. Anything else (creating, reloading
/// or deleting a deployment, and any route added later) needs the full token.
pub(crate) fn task_scope_allows(method: &Method, path: &str) -> bool {
    let reads = matches!(*method, Method::GET | Method::HEAD);
    let path = path.trim_end_matches('/');
    if path.is_empty()
        || path == "/deployments"
        || path == "/status"
        || path == "/openapi.json"
        || path == "/docs"
    {
        return reads;
    }
    let Some(rest) = path.strip_prefix("/deployments/") else {
        return false;
    };
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        [name] => reads && *name != "create",
        // A deployment's UI is a front end for its tasks.
        [_name, "tasks" | "sessions" | "ui", ..] => true,
        _ => false,
    }
}

/// Whether a request is one anyone may make: the health check, and the web console's files
/// (which hold no data: the console asks for the token before it reads any).
pub(crate) fn is_health_check(method: &Method, path: &str) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
        && (matches!(path, "/status" | "/status/" | "/console") || path.starts_with("/console/"))
}

/// A refused request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    /// No token, or a wrong one: 401.
    Unauthorized(&'static str),
    /// The task token on a route that needs the full one: 403.
    Forbidden,
}

impl Refused {
    pub(crate) fn detail(self) -> &'static str {
        match self {
            Self::Unauthorized(detail) => detail,
            Self::Forbidden => {
                "the task token cannot create, reload or delete deployments; use the full token \
                 (DEPLOYD_TOKEN)"
            }
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthorized(detail) => {
                let mut response = ApiError::new(StatusCode::UNAUTHORIZED, detail).into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"deployd\""),
                );
                response
            }
            Self::Forbidden => ApiError::new(StatusCode::FORBIDDEN, self.detail()).into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        let token = Token::new("0123456789abcdef").unwrap();
        assert!(token.matches(b"0123456789abcdef"));
        for wrong in [
            &b""[..],
            b"0123456789abcde",
            b"0123456789abcdef0",
            b"0123456789abcdeF",
            b"x123456789abcdef",
        ] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn short_or_odd_tokens_are_refused() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("0123456789 abcdef").is_err());
        assert!(Token::new("0123456789abcdef\n").is_err());
        assert!(format!("{:?}", Token::new("0123456789abcdef").unwrap()).contains('…'));
    }

    #[test]
    fn what_the_task_token_may_do() {
        for (method, path) in [
            (Method::GET, "/"),
            (Method::GET, "/status/"),
            (Method::GET, "/deployments"),
            (Method::GET, "/deployments/"),
            (Method::GET, "/deployments/d"),
            (Method::GET, "/deployments/d/tasks"),
            (Method::POST, "/deployments/d/tasks/run"),
            (Method::POST, "/deployments/d/tasks/create"),
            (Method::GET, "/deployments/d/tasks/t/events"),
            (Method::POST, "/deployments/d/tasks/t/events"),
            (Method::GET, "/deployments/d/tasks/t/results"),
            (Method::GET, "/deployments/d/tasks/search"),
            (Method::GET, "/deployments/d/tasks/t"),
            (Method::POST, "/deployments/d/tasks/t/cancel"),
            (Method::POST, "/deployments/d/sessions/create"),
            (Method::POST, "/deployments/d/sessions/delete"),
            (Method::GET, "/deployments/d/sessions/s"),
            (Method::GET, "/openapi.json"),
            (Method::GET, "/docs"),
            (Method::GET, "/deployments/d/ui"),
            (Method::POST, "/deployments/d/ui/api/chat"),
        ] {
            assert!(task_scope_allows(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::POST, "/deployments/create"),
            (Method::POST, "/deployments/create/"),
            (Method::GET, "/deployments/create"),
            (Method::DELETE, "/deployments/d"),
            (Method::DELETE, "/deployments/d/delete"),
            (Method::POST, "/deployments/d"),
            (Method::GET, "/deployments/d/other"),
            (Method::GET, "/somewhere"),
            (Method::GET, "/status/metrics"),
            (Method::POST, "/openapi.json"),
            (Method::GET, "/deployments/d/services/s/logs"),
            (Method::GET, "/deployments/d/revisions"),
            (Method::POST, "/deployments/d/rollback"),
        ] {
            assert!(!task_scope_allows(&method, path), "{method} {path}");
        }
    }
}
