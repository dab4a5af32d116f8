//! `/deployments/{name}/ui/...`: the deployment's UI (its file's `ui:` section), proxied to the
//! process deployd supervises for it, as llama_deploy 0.9 does.
//!
//! The path goes upstream as it came (the UI is served under its base path,
//! `LLAMA_DEPLOY_NEXTJS_BASE_PATH`), with the query. Bodies stream both ways; hop-by-hop
//! headers and `Host` are not passed on, nor deployd's own token when the server has tokens;
//! redirects come back to the client as they are. A UI that does not answer is a 502, one
//! whose answer does not begin within [`HEAD_TIMEOUT`] a 504, both with a JSON error. A
//! request asking for a WebSocket is connected upstream first (a refusal there is a 502
//! before the client's upgrade), then messages are passed both ways until either side closes.

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

use crate::error::ApiError;

/// How long the UI may take to begin its answer (a Next.js dev server compiles a page on its
/// first request).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), plus `Host`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Headers of a WebSocket handshake, made anew for the upstream connection.
const HANDSHAKE: [&str; 4] = [
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

/// The client the proxy sends HTTP requests upstream with: no proxy, no redirects followed.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default()
}

fn passed_on(name: &HeaderName, strip_authorization: bool) -> bool {
    let name = name.as_str();
    let token = strip_authorization && name == header::AUTHORIZATION.as_str();
    !(HOP_BY_HOP.contains(&name) || token)
}

/// Whether a request asks to become a WebSocket.
fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("websocket"))
}

/// Proxies `request` to the UI listening on `port`.
pub(crate) async fn proxy(
    http: &reqwest::Client,
    deployment: &str,
    port: u16,
    strip_authorization: bool,
    request: Request,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let unreachable = |err: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "the UI of deployment `{deployment}` does not answer on port {port} ({err}); \
                 see its output with `deployd logs {deployment} @ui`"
            ),
        )
    };
    if wants_websocket(&parts.headers) {
        let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(|err| ApiError::new(err.status(), err.body_text()))?;
        let mut upstream_request = tungstenite::client::IntoClientRequest::into_client_request(
            format!("ws://127.0.0.1:{port}{target}"),
        )
        .map_err(|err| ApiError::bad_request(format!("cannot proxy this WebSocket: {err}")))?;
        for (name, value) in &parts.headers {
            if passed_on(name, strip_authorization) && !HANDSHAKE.contains(&name.as_str()) {
                upstream_request
                    .headers_mut()
                    .append(name.clone(), value.clone());
            }
        }
        let (upstream, answer) = tokio::time::timeout(
            HEAD_TIMEOUT,
            tokio_tungstenite::connect_async(upstream_request),
        )
        .await
        .map_err(|_| timeout(deployment))?
        .map_err(|err| unreachable(&err))?;
        let upgrade = match answer
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|value| value.to_str().ok())
        {
            Some(protocol) => upgrade.protocols([protocol.to_owned()]),
            None => upgrade,
        };
        return Ok(upgrade.on_upgrade(move |socket| pump(socket, upstream)));
    }

    let url = format!("http://127.0.0.1:{port}{target}");
    let mut upstream = http.request(parts.method.clone(), &url);
    for (name, value) in &parts.headers {
        if passed_on(name, strip_authorization) {
            upstream = upstream.header(name, value);
        }
    }
    if let Some(host) = parts.headers.get(header::HOST) {
        upstream = upstream.header("x-forwarded-host", host);
    }
    // A request without a body goes on without one (not as an empty chunked body).
    let upstream = if axum::body::HttpBody::size_hint(&body).exact() == Some(0) {
        upstream
    } else {
        upstream.body(reqwest::Body::wrap_stream(body.into_data_stream()))
    };
    let answer = tokio::time::timeout(HEAD_TIMEOUT, upstream.send())
        .await
        .map_err(|_| timeout(deployment))?
        .map_err(|err| {
            if err.is_timeout() {
                timeout(deployment)
            } else {
                unreachable(&err)
            }
        })?;
    let mut response = Response::builder().status(answer.status().as_u16());
    if let Some(headers) = response.headers_mut() {
        for (name, value) in answer.headers() {
            if passed_on(name, false) {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .map_err(|err| ApiError::new(StatusCode::BAD_GATEWAY, err.to_string()))
}

fn timeout(deployment: &str) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the UI of deployment `{deployment}` did not begin its answer within {HEAD_TIMEOUT:?}"
        ),
    )
}

/// Passes messages between the client's socket and the UI's until either ends.
async fn pump(
    client: WebSocket,
    upstream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_upstream, mut from_upstream) = upstream.split();
    let client_to_upstream = async {
        while let Some(Ok(message)) = from_client.next().await {
            let closing = matches!(message, ws::Message::Close(_));
            if to_upstream.send(upstream_message(message)).await.is_err() || closing {
                break;
            }
        }
        let _ = to_upstream.close().await;
    };
    let upstream_to_client = async {
        while let Some(Ok(message)) = from_upstream.next().await {
            let Some(message) = client_message(message) else {
                continue;
            };
            let closing = matches!(message, ws::Message::Close(_));
            if to_client.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = to_client.close().await;
    };
    tokio::select! {
        () = client_to_upstream => {}
        () = upstream_to_client => {}
    }
}

fn upstream_message(message: ws::Message) -> tungstenite::Message {
    match message {
        ws::Message::Text(text) => tungstenite::Message::Text(text.as_str().into()),
        ws::Message::Binary(bytes) => tungstenite::Message::Binary(bytes),
        ws::Message::Ping(bytes) => tungstenite::Message::Ping(bytes),
        ws::Message::Pong(bytes) => tungstenite::Message::Pong(bytes),
        ws::Message::Close(frame) => {
            tungstenite::Message::Close(frame.map(|frame| tungstenite::protocol::CloseFrame {
                code: frame.code.into(),
                reason: frame.reason.as_str().into(),
            }))
        }
    }
}

fn client_message(message: tungstenite::Message) -> Option<ws::Message> {
    Some(match message {
        tungstenite::Message::Text(text) => ws::Message::Text(text.as_str().into()),
        tungstenite::Message::Binary(bytes) => ws::Message::Binary(bytes),
        tungstenite::Message::Ping(bytes) => ws::Message::Ping(bytes),
        tungstenite::Message::Pong(bytes) => ws::Message::Pong(bytes),
        tungstenite::Message::Close(frame) => {
            ws::Message::Close(frame.map(|frame| ws::CloseFrame {
                code: frame.code.into(),
                reason: frame.reason.as_str().into(),
            }))
        }
        tungstenite::Message::Frame(_) => return None,
    })
}
