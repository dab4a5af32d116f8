//! The OpenAPI document: what the handlers' `#[utoipa::path]` say (see `api::ApiDoc`), plus
//! what every route shares (the token, the errors every request may get), and the page
//! `/docs` that shows it.
//!
//! The page is written here from the document, not by Swagger UI: it needs no script from
//! another site, so it works where deployd has no internet.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::http::{HeaderMap, header};
use utoipa::OpenApi as _;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// The OpenAPI 3.1 document of deployd's API.
pub fn document() -> OpenApi {
    crate::api::ApiDoc::openapi()
}

/// The document as JSON, made once.
pub(crate) fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        document()
            .to_pretty_json()
            .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"))
    })
}

/// The `http://host/` a client reached this server at, for the links of `GET /`: the `Host`
/// header (the guard has checked it), `https` when a proxy in front says so.
pub(crate) fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .filter(|host| !host.is_empty())
        .unwrap_or("localhost");
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    format!("{}://{host}/", if https { "https" } else { "http" })
}

/// The state of a deployment as the API shows it.
pub(crate) fn deployment_status(
    status: deployd_manager::DeploymentStatus,
) -> deployd_api::DeploymentStatus {
    deployd_api::DeploymentStatus {
        name: status.name,
        default_service: status.default_service,
        deploying: status.deploying,
        message_queue: status.message_queue,
        services: status.services.into_iter().map(service_status).collect(),
        ui: status.ui.map(service_status),
    }
}

fn service_status(service: deployd_manager::ServiceStatus) -> deployd_api::ServiceStatus {
    deployd_api::ServiceStatus {
        id: service.id,
        phase: phase(service.phase),
        pid: service.pid,
        port: service.port,
        restarts: service.restarts,
        last_exit: service.last_exit,
        stage: service.stage.map(|stage| deployd_api::StageStatus {
            stage: stage.stage,
            state: stage.state,
            error: stage.error,
        }),
        replicas: service
            .replicas
            .into_iter()
            .map(|replica| deployd_api::ReplicaStatus {
                phase: phase(replica.phase),
                pid: replica.pid,
                port: replica.port,
                restarts: replica.restarts,
                last_exit: replica.last_exit,
            })
            .collect(),
    }
}

fn phase(phase: deployd_manager::Phase) -> deployd_api::Phase {
    use deployd_api::Phase as Api;
    use deployd_manager::Phase;
    match phase {
        Phase::Starting => Api::Starting,
        Phase::Ready => Api::Ready,
        Phase::Restarting => Api::Restarting,
        Phase::Failed => Api::Failed,
        Phase::Exited => Api::Exited,
        Phase::Stopped => Api::Stopped,
        Phase::Pending => Api::Pending,
    }
}

/// What every operation shares, added to the handlers' own descriptions.
pub(crate) struct Additions;

impl utoipa::Modify for Additions {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`--token` (every route) or `--task-token` (tasks, events, results, \
                         sessions, and reading deployments); needed only when the server was \
                         given one",
                    ))
                    .build(),
            ),
        );
        // Optional: a server without tokens takes every request.
        openapi.security = Some(vec![
            SecurityRequirement::new("token", Vec::<String>::new()),
            SecurityRequirement::default(),
        ]);
        for (path, item) in &mut openapi.paths.paths {
            // The health check answers anyone.
            if path == "/status/" || path == "/status" {
                if let Some(get) = &mut item.get {
                    add_shared_errors(get, "get", false);
                    get.responses.responses.remove("401");
                    get.responses.responses.remove("403");
                    get.security = Some(vec![SecurityRequirement::default()]);
                }
                continue;
            }
            let has_params = path.contains('{');
            for (method, operation) in [
                ("get", &mut item.get),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
            ] {
                if let Some(operation) = operation {
                    add_shared_errors(operation, method, has_params);
                }
            }
        }
    }
}

/// The errors any request may get: 400 (a malformed parameter, or a request the guard
/// refuses), 401 and 403 (tokens), 404 (an unknown deployment, task, session or service).
fn add_shared_errors(operation: &mut Operation, method: &str, has_params: bool) {
    let mut shared = vec![
        (
            "400",
            "The request is malformed: a parameter, the body, or its headers",
        ),
        (
            "401",
            "No token, or a wrong one (when the server was given tokens)",
        ),
        (
            "403",
            "The token may not do this, or the request's Host or Origin is refused",
        ),
    ];
    if has_params {
        shared.push(("404", "No such deployment, task, session or service"));
    }
    if method != "get" {
        shared.push(("413", "The body is larger than `--max-body-bytes`"));
    }
    for (code, description) in shared {
        operation
            .responses
            .responses
            .entry(code.to_owned())
            .or_insert_with(|| RefOr::T(error_response(description)));
    }
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// `/docs`: the document as one page, made once.
pub(crate) fn document_page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| render_page(&document()))
}

fn render_page(doc: &OpenApi) -> String {
    let json: serde_json::Value = serde_json::to_value(doc).unwrap_or_default();
    let mut page = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>deployd API</title><style>\
         body{font:15px/1.5 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}\
         code,pre{font:13px ui-monospace,monospace}pre{background:#f5f5f5;padding:.6rem;overflow:auto}\
         .op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.4rem 1rem}\
         .m{display:inline-block;min-width:4.5rem;font-weight:bold;text-transform:uppercase}\
         table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:.2rem .6rem;text-align:left;vertical-align:top}\
         </style></head><body>\n",
    );
    let info = &json["info"];
    let _ = writeln!(
        page,
        "<h1>{} {}</h1><p>{}</p><p>The machine-readable document: \
         <a href=\"openapi.json\"><code>/openapi.json</code></a> (OpenAPI {}).</p>",
        escape(info["title"].as_str().unwrap_or("deployd")),
        escape(info["version"].as_str().unwrap_or("")),
        escape(info["description"].as_str().unwrap_or("")),
        escape(json["openapi"].as_str().unwrap_or("")),
    );
    let empty = serde_json::Map::new();
    let paths = json["paths"].as_object().unwrap_or(&empty);
    for tag in json["tags"].as_array().into_iter().flatten() {
        let name = tag["name"].as_str().unwrap_or_default();
        let _ = writeln!(
            page,
            "<h2 id=\"{0}\">{0}</h2><p>{1}</p>",
            escape(name),
            escape(tag["description"].as_str().unwrap_or(""))
        );
        for (path, item) in paths {
            for method in ["get", "post", "delete"] {
                let op = &item[method];
                let in_tag = op["tags"]
                    .as_array()
                    .is_some_and(|tags| tags.iter().any(|t| t == name));
                if in_tag {
                    render_operation(&mut page, method, path, op);
                }
            }
        }
    }
    page.push_str("<h2 id=\"schemas\">Schemas</h2>\n");
    let schemas = json["components"]["schemas"].as_object().unwrap_or(&empty);
    for (name, schema) in schemas {
        let _ = writeln!(
            page,
            "<h3 id=\"schema-{0}\">{0}</h3><pre>{1}</pre>",
            escape(name),
            escape(&serde_json::to_string_pretty(schema).unwrap_or_default())
        );
    }
    page.push_str("</body></html>\n");
    page
}

fn render_operation(page: &mut String, method: &str, path: &str, op: &serde_json::Value) {
    let _ = write!(
        page,
        "<div class=\"op\"><h3><span class=\"m\">{}</span> <code>{}</code></h3><p>{}</p>",
        method,
        escape(path),
        escape(op["summary"].as_str().unwrap_or(""))
    );
    if let Some(description) = op["description"].as_str() {
        let _ = write!(page, "<p>{}</p>", escape(description));
    }
    if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
        page.push_str("<table><tr><th>parameter</th><th>in</th><th></th></tr>");
        for param in params {
            let _ = write!(
                page,
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
                escape(param["name"].as_str().unwrap_or("")),
                if param["required"] == true { " *" } else { "" },
                escape(param["in"].as_str().unwrap_or("")),
                escape(param["description"].as_str().unwrap_or(""))
            );
        }
        page.push_str("</table>");
    }
    if let Some(body) = op["requestBody"]["content"].as_object() {
        let kinds: Vec<String> = body
            .keys()
            .map(|k| format!("<code>{}</code>", escape(k)))
            .collect();
        let _ = write!(page, "<p>Body: {}</p>", kinds.join(", "));
    }
    page.push_str("<table><tr><th>status</th><th></th></tr>");
    if let Some(responses) = op["responses"].as_object() {
        for (code, response) in responses {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape(code),
                escape(response["description"].as_str().unwrap_or(""))
            );
        }
    }
    page.push_str("</table></div>\n");
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            other => out.push(other),
        }
    }
    out
}
