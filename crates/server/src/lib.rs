//! deployd's HTTP API and its typed Rust client.
//!
//! [`router`] serves llama_deploy's routes (`/status/`, `/deployments/...`) over a
//! [`deployd_manager::Manager`], with the same JSON payloads, so that llama_deploy's CLI and
//! client keep working, plus deployd's own (`DELETE /deployments/{name}`, resumable event
//! streams, paged task lists). Every error is a JSON `{"detail": ...}` with a 4xx status when
//! the request was at fault. [`client::Client`] is the typed client the `deployd` CLI uses.
//!
//! Every request passes a guard first (see [`ApiOptions`]): its `Host` must be a name the
//! server answers to, and a change (`POST`, `PUT`, `PATCH`, `DELETE`) must not come from a web
//! page of another origin nor carry a body a page could send unasked (only `application/json`
//! and `multipart/form-data` bodies are read). Clients on other machines deploy only from the
//! folders the operator allowed.
//!
//! With tokens configured ([`ApiOptions::tokens`]), every request but the health check needs
//! one (see [`auth`]).
//!
//! Only this crate knows HTTP and the wire JSON of the API.

mod api;
pub mod auth;
mod base_path;
mod console;

pub mod client;
mod error;
mod guard;
mod logs;
mod metrics;
mod openapi;
mod options;
mod ui_proxy;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deployd_manager::Manager;
use tokio::net::TcpListener;

pub use api::router;
pub use error::ApiError;
pub use openapi::document as openapi_document;
pub use options::{
    AllowedHost, ApiOptions, CorsOrigin, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_STREAMS,
    DEFAULT_RUN_TIMEOUT, InvalidHost, InvalidOrigin,
};

/// Serves the API on `listener` until `shutdown` resolves, then finishes the requests in
/// flight (they end when the Manager shuts down: resolve `shutdown` first, then shut the
/// Manager down, so that cut waits answer 503 "shutting down").
pub async fn serve(
    listener: TcpListener,
    manager: Manager,
    options: ApiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shutting_down = Arc::new(AtomicBool::new(false));
    let app = api::routes(manager, options, Arc::clone(&shutting_down));
    // Every accepted connection gets TCP_NODELAY: a streamed answer is written in small
    // pieces, and with Nagle's algorithm each piece after the first waited for the client's
    // delayed ACK (about 40 ms per event stream on a keep-alive connection).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY on a connection");
        }
    });
    // Boxed: the server's future is deeply nested, and callers' futures hold this one.
    Box::pin(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            shutting_down.store(true, Ordering::SeqCst);
        })
        .into_future(),
    )
    .await
}
