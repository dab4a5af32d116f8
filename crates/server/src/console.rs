//! The web console: a page of plain JavaScript modules (`crates/server/console/`, embedded at
//! build time) served at `/console`, which drives deployd through its JSON API with the
//! browser's token. The files hold no data, so they are served without a token; every request
//! the page makes for data needs one, as any client's.
//!
//! With `DEPLOYD_CONSOLE_DIR` set, the files are read from that folder on each request
//! instead, any plain file of it (for working on the console without rebuilding deployd).

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// `(name, content type, ETag, bytes)` of every file of the console.
type Asset = (&'static str, &'static str, &'static str, &'static [u8]);
const ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// `GET /console`: the console's page.
pub(crate) async fn page(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /console/{path}`: one of its files.
pub(crate) async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let found = match std::env::var_os("DEPLOYD_CONSOLE_DIR") {
        // Working on the console: every plain file of the folder, read at each request.
        Some(dir) if is_plain_name(name) => std::fs::read(std::path::Path::new(&dir).join(name))
            .ok()
            .map(|bytes| (content_type(name), None, bytes)),
        Some(_) => None,
        None => ASSETS
            .iter()
            .find(|(asset, ..)| *asset == name)
            .map(|&(_, kind, tag, bytes)| (kind, Some(tag), bytes.to_vec())),
    };
    let Some((kind, tag, body)) = found else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the console has no file `{name}`"),
        )
        .into_response();
    };
    // The browser revalidates each time (`no-cache`), and an unchanged file (the same ETag:
    // the same deployd) is a 304 without its bytes.
    if let Some(tag) = tag
        && headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.split(',').any(|given| given.trim() == tag))
    {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, HeaderValue::from_static(tag))],
        )
            .into_response();
    }
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
    if let Some(tag) = tag {
        response
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_static(tag));
    }
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

/// A file name of the console's folder: no folder, no `..`, no hidden file.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\'])
}

include!("content_type.rs");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_embedded_with_its_content_types() {
        let page = ASSETS.iter().find(|(name, ..)| *name == "index.html");
        let (_, kind, tag, bytes) = page.expect("index.html is embedded");
        assert_eq!(*kind, "text/html; charset=utf-8");
        assert!(String::from_utf8_lossy(bytes).contains("<html"));
        assert!(
            tag.starts_with('"') && tag.ends_with('"') && tag.len() == 18,
            "{tag}"
        );
        for (name, kind, _, _) in ASSETS {
            assert_eq!(*kind, content_type(name), "{name}");
            assert!(is_plain_name(name), "{name}");
        }
        assert!(!is_plain_name("../Cargo.toml") && !is_plain_name(".hidden"));
        assert!(!is_plain_name("a/b.js"));
    }

    #[test]
    fn an_unchanged_file_is_a_304_without_its_bytes() {
        let (_, _, tag, bytes) = ASSETS
            .iter()
            .find(|(name, ..)| *name == "app.js")
            .expect("app.js is embedded");
        let first = serve("app.js", &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()[header::ETAG], *tag);
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, HeaderValue::from_static(tag));
        let cached = serve("app.js", &again);
        assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
        assert!(!bytes.is_empty());
        let mut other = HeaderMap::new();
        other.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"0\""));
        assert_eq!(serve("app.js", &other).status(), StatusCode::OK);
        assert_eq!(
            serve("missing.js", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }
}
