//! The web console: a page of plain JavaScript modules (`crates/server/console/`, embedded at
//! build time) served at `/console`, which drives deployd through its JSON API with the
//! browser's token. The files hold no data, so they are served without a token; every request
//! the page makes for data needs one, as any client's.
//!
//! With `DEPLOYD_CONSOLE_DIR` set, the files are read from that folder on each request
//! instead (for working on the console without rebuilding deployd).

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// `(name, content type, bytes)` of every file of the console.
const ASSETS: &[(&str, &str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// `GET /console`: the console's page.
pub(crate) async fn page() -> Response {
    serve("index.html")
}

/// `GET /console/{path}`: one of its files.
pub(crate) async fn asset(Path(path): Path<String>) -> Response {
    serve(&path)
}

fn serve(name: &str) -> Response {
    let Some(&(name, kind, bytes)) = ASSETS.iter().find(|(asset, _, _)| *asset == name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the console has no file `{name}`"),
        )
        .into_response();
    };
    let body = match std::env::var_os("DEPLOYD_CONSOLE_DIR") {
        Some(dir) => std::fs::read(std::path::Path::new(&dir).join(name)).unwrap_or_default(),
        None => bytes.to_vec(),
    };
    let mut response = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response();
    if name == "index.html" {
        // Only the page's own files run in it.
        response.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                 frame-ancestors 'none'",
            ),
        );
    }
    response
}
