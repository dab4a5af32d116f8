//! deployd's HTTP API and its typed Rust client.
//!
//! [`router`] serves llama_deploy's routes (`/status/`, `/deployments/...`) over a
//! [`deployd_manager::Manager`], with the same JSON payloads, so that llama_deploy's CLI and
//! client keep working, plus deployd's own (`DELETE /deployments/{name}`, resumable event
//! streams). Every error is a JSON `{"detail": ...}` with a 4xx status when the request was at
//! fault. [`client::Client`] is the typed client the `deployd` CLI uses.
//!
//! Only this crate knows HTTP and the wire JSON of the API.

mod api;
pub mod client;
mod error;
pub mod wire;

use std::future::Future;

use deployd_manager::Manager;
use tokio::net::TcpListener;

pub use api::router;
pub use error::ApiError;

/// Serves the API on `listener` until `shutdown` resolves, then finishes the requests in
/// flight (streams end when the Manager shuts down).
pub async fn serve(
    listener: TcpListener,
    manager: Manager,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(manager))
        .with_graceful_shutdown(shutdown)
        .await
}
