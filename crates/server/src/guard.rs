//! The request guard: what a request must look like before any route sees it.
//!
//! deployd runs what a deployment file says, and listening on loopback does not keep web pages
//! out: any page the operator visits can send a `POST` to `127.0.0.1`, and a page on a domain
//! whose DNS answer changes to `127.0.0.1` (DNS rebinding) can even read the answers. So:
//!
//! - every request's `Host` must be a name this server answers to (its listen addresses, and
//!   the names of `--allow-host`); a request without `Host` (HTTP/1.0) is let through;
//! - a request that changes something (`POST`, `PUT`, `PATCH`, `DELETE`) and comes from a web
//!   page (it carries an `Origin`, or else `Sec-Fetch-Site: cross-site` or `same-site`) is
//!   refused unless the page's origin is one of those names; clients that send no `Origin`
//!   (curl, llamactl, llama_deploy's Python client, the deployd CLI) are not affected;
//! - a body of such a request must be `application/json`, `multipart/form-data` or YAML
//!   (`application/yaml`, `application/x-yaml`, `text/yaml`): the content
//!   types a page can send without asking first (`text/plain`,
//!   `application/x-www-form-urlencoded`) are refused. A request without a body and without a
//!   content type (llama_deploy's client creates sessions so) is let through.
//!
//! Everything refused is a 403 `{"detail": ...}` that says what was refused and how to allow it.

use std::sync::Arc;

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{self, Access, Refused};
use crate::error::ApiError;
use crate::options::{ApiOptions, Authority};

/// The middleware: refuses what [`check`] refuses, and passes the rest on.
pub(crate) async fn guard(
    State(options): State<Arc<ApiOptions>>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(refused) = check(&options, &request) {
        tracing::warn!(
            method = %request.method(),
            path = %request.uri().path(),
            reason = %refused.detail,
            "request refused"
        );
        return refused.into_response();
    }
    let (method, path) = (request.method(), request.uri().path());
    let access = match auth::access(&options.tokens, request.headers()) {
        Ok(Access::Tasks) if !auth::task_scope_allows(method, path) => Err(Refused::Forbidden),
        Ok(access) => Ok(access),
        Err(_) if auth::is_health_check(method, path) => Ok(Access::Anonymous),
        Err(refused) => Err(refused),
    };
    match access {
        Ok(access) => {
            let mut request = request;
            request.extensions_mut().insert(access);
            next.run(request).await
        }
        Err(refused) => {
            tracing::warn!(
                method = %method,
                path = %path,
                reason = refused.detail(),
                "request refused"
            );
            refused.into_response()
        }
    }
}

fn forbidden(detail: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, detail)
}

/// Checks a request's `Host`, and for a request that changes something its `Origin` and
/// content type.
pub(crate) fn check(options: &ApiOptions, request: &Request) -> Result<(), ApiError> {
    check_host(options, request)?;
    let method = request.method();
    if matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        let what = format!("{method} {}", request.uri().path());
        check_origin(options, request.headers(), &what)?;
        let has_body = request.body().size_hint().exact() != Some(0);
        // A deployment's UI takes what its pages send (forms too); its pages come from this
        // server, so the origin check above still keeps other sites' pages out.
        if has_body && !is_ui_path(request.uri().path()) {
            check_content_type(request.headers(), &what)?;
        }
    }
    Ok(())
}

/// Whether `path` is under a deployment's UI (`/deployments/{name}/ui[/...]`).
pub(crate) fn is_ui_path(path: &str) -> bool {
    let mut segments = path.trim_start_matches('/').split('/');
    segments.next() == Some("deployments")
        && segments.next().is_some_and(|name| !name.is_empty())
        && segments.next() == Some("ui")
}

fn check_host(options: &ApiOptions, request: &Request) -> Result<(), ApiError> {
    let from_header = request
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|value| value.to_str().unwrap_or("(not text)").to_owned());
    // An absolute request target (`POST http://name/...`) names the host too.
    let from_target = request.uri().authority().map(|a| a.as_str().to_owned());
    for host in from_header.chain(from_target) {
        let allowed = Authority::parse(host.trim())
            .is_some_and(|a| options.allows(&a.host, a.port.unwrap_or(80)));
        if !allowed {
            return Err(forbidden(format!(
                "request refused: Host `{host}` is not a name this server answers to ({}); a web \
                 page on another domain may be trying to reach deployd (DNS rebinding). To \
                 serve deployd under this name, start it with `--allow-host {}` (or add it to \
                 DEPLOYD_ALLOW_HOSTS)",
                options.describe_hosts(),
                suggestion(&host),
            )));
        }
    }
    Ok(())
}

/// A host as `--allow-host` takes it, for a message.
fn suggestion(host: &str) -> String {
    let host = host.trim();
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        "NAME[:PORT]".to_owned()
    } else {
        host.to_owned()
    }
}

fn check_origin(options: &ApiOptions, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    let origins: Vec<&str> = headers
        .get_all(header::ORIGIN)
        .iter()
        .map(|value| value.to_str().unwrap_or("(not text)"))
        .collect();
    if origins.is_empty() {
        let site = headers
            .get("sec-fetch-site")
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim().to_ascii_lowercase());
        return match site.as_deref() {
            Some(site @ ("cross-site" | "same-site")) => Err(forbidden(format!(
                "cross-origin request refused: {what} was sent by a web page of another site \
                 (Sec-Fetch-Site: {site}) and deployd runs the code of what it is sent. Send \
                 it from a client that is not a web page (the deployd CLI, llamactl, curl), or \
                 from a page whose origin is allowed with `--allow-host`"
            ))),
            _ => Ok(()),
        };
    }
    for origin in origins {
        let origin = origin.trim();
        if origin == "null" {
            return Err(forbidden(format!(
                "cross-origin request refused: {what} was sent with `Origin: null` (a sandboxed \
                 page, a local file or a redirect), which cannot be allowed. Send it from a \
                 client that is not a web page (the deployd CLI, llamactl, curl)"
            )));
        }
        match parse_origin(origin) {
            Some((authority, port))
                if options.allows(&authority.host, port) || options.cors_allows(origin) => {}
            parsed => {
                let allow = match parsed {
                    Some((authority, port)) => format!("{}:{port}", authority.host),
                    None => "NAME[:PORT]".to_owned(),
                };
                return Err(forbidden(format!(
                    "cross-origin request refused: {what} was sent by a web page of `{origin}`, \
                     which is not one of this server's origins ({}); a page the operator \
                     visits must not be able to deploy and run code. Send it from a client \
                     that is not a web page (the deployd CLI, llamactl, curl), or trust pages \
                     of that origin by starting deployd with `--allow-host {allow}`",
                    options.describe_hosts(),
                )));
            }
        }
    }
    Ok(())
}

/// `http://host[:port]` or `https://host[:port]`: the authority and the port (the scheme's
/// default when none is written).
fn parse_origin(origin: &str) -> Option<(Authority, u16)> {
    let (scheme, rest) = origin.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = Authority::parse(rest)?;
    let port = authority.port.unwrap_or(default_port);
    Some((authority, port))
}

fn check_content_type(headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("(not text)"));
    let essence = content_type.map(|value| {
        value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    match essence.as_deref() {
        // A deployment file may also come as YAML: a page cannot send that type to another
        // site without asking first either.
        Some(
            "application/json"
            | "multipart/form-data"
            | "application/yaml"
            | "application/x-yaml"
            | "text/yaml",
        ) => Ok(()),
        _ => Err(forbidden(format!(
            "request refused: {what} has a body {}; deployd accepts bodies of type \
             `application/json`, `application/yaml` or `multipart/form-data` only: a web page \
             cannot send JSON or YAML to another site without asking first, and its forms \
             carry their `Origin`. Send JSON with `Content-Type: application/json`, a \
             deployment file as `application/yaml` or as the multipart field `config_file`",
            match content_type {
                Some(value) => format!("of type `{value}`"),
                None => "and no Content-Type".to_owned(),
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    /// What the guard says of a request: `Ok` or the start of the refusal.
    fn check_request(
        method: &str,
        headers: &[(&str, &str)],
        body: &'static str,
        expected: Result<(), &str>,
    ) {
        let options = ApiOptions::new("127.0.0.1:4501".parse().unwrap())
            .allow_host("ui.example:3000".parse().unwrap());
        let mut request = Request::builder().method(method).uri("/deployments/create");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::from(body)).unwrap();
        let got = check(&options, &request);
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(err), Err(expected)) => {
                assert_eq!(err.status, StatusCode::FORBIDDEN);
                assert!(
                    err.detail.starts_with(expected),
                    "{method} {headers:?}: {}",
                    err.detail
                );
            }
            (got, expected) => {
                panic!("{method} {headers:?}: got {got:?}, expected {expected:?}")
            }
        }
    }

    const HOST: (&str, &str) = ("host", "127.0.0.1:4501");
    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn hosts() {
        check_request("GET", &[HOST], "", Ok(()));
        check_request("GET", &[("host", "localhost:4501")], "", Ok(()));
        check_request("GET", &[], "", Ok(()));
        check_request("GET", &[("host", "ui.example:3000")], "", Ok(()));
        for host in ["evil.example:4501", "127.0.0.1:80", "127.0.0.1", "a b", ""] {
            check_request("GET", &[("host", host)], "", Err("request refused: Host"));
        }
    }

    #[test]
    fn origins_of_changes() {
        let refused = Err("cross-origin request refused");
        check_request("POST", &[HOST, JSON], "{}", Ok(()));
        for origin in [
            "http://127.0.0.1:4501",
            "http://localhost:4501",
            "HTTP://[::1]:4501",
            "https://ui.example:3000",
        ] {
            check_request("POST", &[HOST, JSON, ("origin", origin)], "{}", Ok(()));
        }
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:4502",
            "http://127.0.0.1",
            "https://ui.example",
            "null",
            "file://",
            "chrome-extension://abc",
            "garbage",
        ] {
            check_request("POST", &[HOST, JSON, ("origin", origin)], "{}", refused);
            check_request("DELETE", &[HOST, ("origin", origin)], "", refused);
        }
        check_request(
            "POST",
            &[HOST, JSON, ("sec-fetch-site", "cross-site")],
            "{}",
            refused,
        );
        check_request(
            "PUT",
            &[HOST, JSON, ("sec-fetch-site", "same-site")],
            "{}",
            refused,
        );
        for site in ["same-origin", "none"] {
            check_request(
                "POST",
                &[HOST, JSON, ("sec-fetch-site", site)],
                "{}",
                Ok(()),
            );
        }
        // Reading is not a change: a page cannot read the answer without CORS anyway.
        check_request(
            "GET",
            &[HOST, ("origin", "http://evil.example")],
            "",
            Ok(()),
        );
    }

    #[test]
    fn content_types_of_changes() {
        let refused = Err("request refused: POST /deployments/create has a body");
        check_request("POST", &[HOST], "", Ok(()));
        check_request("POST", &[HOST, JSON], "{}", Ok(()));
        check_request(
            "POST",
            &[HOST, ("content-type", "Application/JSON; charset=utf-8")],
            "{}",
            Ok(()),
        );
        check_request(
            "POST",
            &[HOST, ("content-type", "multipart/form-data; boundary=x")],
            "--x--",
            Ok(()),
        );
        check_request(
            "POST",
            &[HOST, ("content-type", "application/yaml")],
            "name: x",
            Ok(()),
        );
        check_request("POST", &[HOST], "name: x", refused);
        for content_type in [
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "application/jsonx",
        ] {
            check_request(
                "POST",
                &[HOST, ("content-type", content_type)],
                "x",
                refused,
            );
        }
    }
}
