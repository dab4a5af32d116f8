use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use deployd_manager::Error;
use serde_json::json;

/// An error answer: a status and `{"detail": ...}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message shown to the client.
    pub detail: String,
    /// Structured diagnostics of a deployment file, when that is what failed.
    pub diagnostics: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            diagnostics: None,
        }
    }

    /// A 400 Bad Request.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let status = match &err {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) | Error::TooManyDeployments(_) | Error::Conflict(_) => {
                StatusCode::CONFLICT
            }
            Error::Unavailable(_) | Error::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Invalid(_)
            | Error::BadRequest(_)
            | Error::Source { .. }
            | Error::Build { .. } => StatusCode::BAD_REQUEST,
            // The store (a PostgreSQL server cut off, a full disk) is a dependency that is
            // down for now, like a broker.
            Error::ShuttingDown | Error::Queue(_) | Error::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let detail = match &err {
            // llama_deploy's exact text, which its clients may match on.
            Error::NotFound {
                what: "deployment", ..
            } => "Deployment not found".to_owned(),
            Error::Invalid(diagnostics) => diagnostics.to_string(),
            other => other.to_string(),
        };
        if status.is_server_error() {
            tracing::error!(error = %err, "request failed");
        }
        let diagnostics = match &err {
            Error::Invalid(diagnostics) => Some(
                diagnostics
                    .items
                    .iter()
                    .map(|d| {
                        json!({
                            "severity": format!("{:?}", d.severity).to_lowercase(),
                            "file": d.origin,
                            "line": d.line,
                            "column": d.column,
                            "key": d.key,
                            "message": d.message,
                        })
                    })
                    .collect(),
            ),
            _ => None,
        };
        Self {
            status,
            detail,
            diagnostics,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "detail": self.detail });
        if let Some(diagnostics) = self.diagnostics {
            body["diagnostics"] = diagnostics;
        }
        (self.status, Json(body)).into_response()
    }
}
