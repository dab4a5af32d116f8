//! The API over a real Manager: the request guard, the deploy folder policy, the run timeout,
//! task input checks, paging, and deletes while clients wait.
//!
//! Services here are shell commands that never answer (`sleep`), so tasks stay queued: what is
//! tested is what the server answers, not what a service computes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use deployd_manager::{Manager, Options};
use deployd_server::{ApiOptions, client::Client};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Where the test server says it listens (for the `Host` of requests made with `oneshot`).
const LISTEN: &str = "127.0.0.1:4501";

/// A client on this machine.
const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 50000);

/// A client on another machine.
const REMOTE: ([u8; 4], u16) = ([192, 0, 2, 7], 50000);

struct Fixture {
    dir: tempfile::TempDir,
    manager: Manager,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manager = Manager::start(
            Options::new(dir.path().join("data")).stop_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        std::fs::create_dir(dir.path().join("project")).unwrap();
        Self { dir, manager }
    }

    /// A folder for deployment files and markers.
    fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    /// The router as a client at `peer` sees it.
    fn app(&self, options: ApiOptions, peer: ([u8; 4], u16)) -> Router {
        deployd_server::router(self.manager.clone(), options)
            .layer(MockConnectInfo(SocketAddr::from(peer)))
    }

    /// The router with default options, seen from this machine.
    fn local(&self) -> Router {
        self.app(ApiOptions::new(LISTEN.parse().unwrap()), LOOPBACK)
    }

    /// Deploys `name`, a service that starts and never becomes ready, from this machine.
    async fn deploy_sleeper(&self, app: &Router, name: &str) {
        let file = format!("name: {name}\nservices:\n  svc:\n    command: sleep 600\n");
        let (status, _, body) = call(app, post_json(&self.create_url(), &file)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    fn create_url(&self) -> String {
        format!(
            "/deployments/create?wait=false&base_path={}",
            self.project().display()
        )
    }

    async fn shutdown(self) {
        self.manager.shutdown().await;
    }
}

/// A request to the test server, with the `Host` a client of it sends.
fn request(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", LISTEN)
}

fn get(uri: &str) -> Request<Body> {
    request("GET", uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    request("POST", uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// Calls the router: status, headers, and the body as JSON (`Null` when it is not).
async fn call(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

fn detail(body: &Value) -> &str {
    body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {body}"))
}

/// A deployment whose service touches `marker` when it starts.
fn marker_file(name: &str, marker: &Path) -> String {
    format!(
        "name: {name}\nservices:\n  svc:\n    command: [\"sh\", \"-c\", \"touch '{}' && exec sleep 600\"]\n",
        marker.display()
    )
}

async fn wait_for_file(path: &Path) {
    let appeared = tokio::time::timeout(Duration::from_secs(30), async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(appeared.is_ok(), "{} never appeared", path.display());
}

/// Serves the API on a free loopback port; returns its address and a sender that stops it.
async fn serve(
    manager: &Manager,
    options: impl FnOnce(SocketAddr) -> ApiOptions,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(deployd_server::serve(
        listener,
        manager.clone(),
        options(address),
        async move {
            let _ = stopped.await;
        },
    ));
    (address, stop)
}

#[tokio::test]
async fn a_web_page_cannot_deploy_but_the_cli_llamactl_and_json_clients_can() {
    let fixture = Fixture::new().await;
    let (address, _stop) = serve(&fixture.manager, ApiOptions::new).await;
    let base = format!("http://{address}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let create = format!(
        "{base}/deployments/create?wait=false&base_path={}",
        fixture.project().display()
    );

    // What a page the operator visits can send without asking first: a text/plain POST.
    let marker = fixture.project().join("page-ran");
    let file = marker_file("page", &marker);
    for (origin, content_type, refused) in [
        (
            Some("http://evil.example"),
            "text/plain",
            "cross-origin request refused: POST /deployments/create was sent by a web page of \
             `http://evil.example`",
        ),
        (
            Some("null"),
            "text/plain",
            "cross-origin request refused: POST /deployments/create was sent with `Origin: null`",
        ),
        (
            None,
            "text/plain;charset=UTF-8",
            "request refused: POST /deployments/create has a body of type \
             `text/plain;charset=UTF-8`",
        ),
        (
            None,
            "application/x-www-form-urlencoded",
            "request refused: POST /deployments/create has a body of type",
        ),
    ] {
        let mut request = http
            .post(&create)
            .header("content-type", content_type)
            .body(file.clone());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
        let body: Value = response.json().await.unwrap();
        assert!(detail(&body).starts_with(refused), "{body}");
    }
    // A page may send a form as multipart too: its Origin gives it away.
    let form = reqwest::multipart::Form::new().part(
        "config_file",
        reqwest::multipart::Part::text(file.clone()).file_name("deployment.yml"),
    );
    let response = http
        .post(&create)
        .header("origin", "http://evil.example")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert!(
        detail(&body).contains("--allow-host evil.example:80"),
        "says how to allow it: {body}"
    );
    assert!(fixture.manager.list().is_empty(), "nothing was deployed");
    assert!(!marker.exists(), "nothing ran");

    // deployd's own client (as llamactl: multipart field `config_file`, no Origin).
    let marker = fixture.project().join("cli-ran");
    let path = fixture.project().join("cli.yaml");
    std::fs::write(&path, marker_file("cli", &marker)).unwrap();
    let (name, _) = Client::new(&base).deploy(&path, false).await.unwrap();
    assert_eq!(name, "cli");
    wait_for_file(&marker).await;

    // A JSON client: the deployment file in JSON, no Origin.
    let marker = fixture.project().join("json-ran");
    let file = json!({
        "name": "json",
        "services": {
            "svc": {
                "command": ["sh", "-c", format!("touch '{}' && exec sleep 600", marker.display())]
            }
        }
    });
    let response = http
        .post(&create)
        .header("content-type", "application/json")
        .body(file.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    wait_for_file(&marker).await;

    // A page of the server's own origin may change things.
    let response = http
        .delete(format!("{base}/deployments/json"))
        .header("origin", &base)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(fixture.manager.list(), ["cli"]);
    fixture.shutdown().await;
}

#[tokio::test]
async fn requests_for_other_host_names_are_refused() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    // DNS rebinding: a page of rebind.evil.example whose name now points to 127.0.0.1 reads
    // the API as same-origin; only its Host gives it away.
    let request = Request::builder()
        .uri("/deployments/")
        .header("host", "rebind.evil.example:4501")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = call(&app, request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        detail(&body),
        "request refused: Host `rebind.evil.example:4501` is not a name this server answers to \
         (127.0.0.1:4501, localhost:4501, [::1]:4501); a web page on another domain may be \
         trying to reach deployd (DNS rebinding). To serve deployd under this name, start it \
         with `--allow-host rebind.evil.example:4501` (or add it to DEPLOYD_ALLOW_HOSTS)"
    );
    for host in ["localhost:4501", "[::1]:4501"] {
        let request = Request::builder()
            .uri("/status/")
            .header("host", host)
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(&app, request).await.0, StatusCode::OK, "{host}");
    }
    // HTTP/1.0 clients may send no Host.
    let request = Request::builder()
        .uri("/status/")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, request).await.0, StatusCode::OK);

    // The operator can allow a name.
    let options =
        ApiOptions::new(LISTEN.parse().unwrap()).allow_host("deployd.internal".parse().unwrap());
    let app = fixture.app(options, LOOPBACK);
    let request = Request::builder()
        .uri("/status/")
        .header("host", "deployd.internal")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, request).await.0, StatusCode::OK);
    fixture.shutdown().await;
}

#[tokio::test]
async fn llama_deploy_clients_bodiless_posts_are_accepted() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    fixture.deploy_sleeper(&app, "sessions").await;
    // llama_deploy's client creates and deletes sessions with no body and no content type.
    let create = request("POST", "/deployments/sessions/sessions/create")
        .body(Body::empty())
        .unwrap();
    let (status, _, session) = call(&app, create).await;
    assert_eq!(status, StatusCode::OK, "{session}");
    let id = session["session_id"].as_str().unwrap();
    let delete = request(
        "POST",
        &format!("/deployments/sessions/sessions/delete?session_id={id}"),
    )
    .header("content-length", "0")
    .body(Body::empty())
    .unwrap();
    let (status, _, body) = call(&app, delete).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    fixture.shutdown().await;
}

#[tokio::test]
async fn clients_on_other_machines_deploy_only_from_allowed_folders() {
    let fixture = Fixture::new().await;
    let file = "name: remote\nservices:\n  svc:\n    command: sleep 600\n";
    let allowed = fixture.dir.path().join("allowed");
    std::fs::create_dir_all(allowed.join("project")).unwrap();
    let options = || ApiOptions::new(LISTEN.parse().unwrap()).allow_base_path(&allowed);
    let remote = fixture.app(options(), REMOTE);

    for (base_path, expected) in [
        (
            "/etc",
            "base_path `/etc` is not inside a folder this server lets clients on other machines \
             deploy from",
        ),
        (
            &*fixture.project().display().to_string(),
            "is not inside a folder this server lets clients on other machines deploy from",
        ),
    ] {
        let (status, _, body) = call(
            &remote,
            post_json(
                &format!("/deployments/create?wait=false&base_path={base_path}"),
                file,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(detail(&body).contains(expected), "{body}");
        assert!(detail(&body).contains("--allow-base-path"), "{body}");
    }
    // Without base_path, the server's working directory is not allowed either.
    let (status, _, body) = call(&remote, post_json("/deployments/create", file)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        detail(&body).contains("the server's working directory"),
        "{body}"
    );
    assert!(fixture.manager.list().is_empty());

    // Inside an allowed folder.
    let uri = format!(
        "/deployments/create?wait=false&base_path={}",
        allowed.join("project").display()
    );
    let (status, _, body) = call(&remote, post_json(&uri, file)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fixture.manager.list(), ["remote"]);

    // From this machine any folder goes, but it must be one.
    let local = fixture.app(options(), LOOPBACK);
    let missing = fixture.dir.path().join("missing");
    let (status, _, body) = call(
        &local,
        post_json(
            &format!(
                "/deployments/create?wait=false&base_path={}",
                missing.display()
            ),
            file,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        detail(&body),
        format!("base_path `{}` does not exist", missing.display())
    );
    let not_a_folder = fixture.dir.path().join("file");
    std::fs::write(&not_a_folder, "x").unwrap();
    let (status, _, body) = call(
        &local,
        post_json(
            &format!(
                "/deployments/create?wait=false&base_path={}",
                not_a_folder.display()
            ),
            file,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        detail(&body),
        format!("base_path `{}` is not a directory", not_a_folder.display())
    );
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_run_that_outlasts_the_timeout_answers_504_with_where_to_read_the_result() {
    let fixture = Fixture::new().await;
    let options = ApiOptions::new(LISTEN.parse().unwrap()).run_timeout(Duration::from_millis(200));
    let app = fixture.app(options, LOOPBACK);
    fixture.deploy_sleeper(&app, "slow").await;
    let run = call(
        &app,
        post_json("/deployments/slow/tasks/run", r#"{"input": "{}"}"#),
    );
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run still waits long after its timeout");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let (_, _, tasks) = call(&app, get("/deployments/slow/tasks")).await;
    let id = tasks[0]["task_id"].as_str().unwrap();
    assert_eq!(
        detail(&body),
        format!(
            "task {id} has not finished after 200ms; it still runs, and its result can be read \
             at /deployments/slow/tasks/{id}/results"
        )
    );
    let (status, _, result) =
        call(&app, get(&format!("/deployments/slow/tasks/{id}/results"))).await;
    assert_eq!((status, result), (StatusCode::OK, Value::Null));
    fixture.shutdown().await;
}

#[tokio::test]
async fn task_bodies_and_inputs_must_be_json_objects() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    fixture.deploy_sleeper(&app, "inputs").await;
    for route in ["create", "run"] {
        let uri = format!("/deployments/inputs/tasks/{route}");
        for (body, expected) in [
            (
                r#"["{}", null, null, null]"#,
                "the request body must be a JSON object, not an array",
            ),
            (
                r#""{}""#,
                "the request body must be a JSON object, not a string",
            ),
            (
                r#"{"input": "[1,2]"}"#,
                "`input` must be a JSON object of keyword arguments (the workflow runs as \
                 `run(**input)`), not an array",
            ),
            (
                r#"{"input": "3"}"#,
                "`input` must be a JSON object of keyword arguments (the workflow runs as \
                 `run(**input)`), not a number",
            ),
            (
                r#"{"input": "\"x\""}"#,
                "`input` must be a JSON object of keyword arguments (the workflow runs as \
                 `run(**input)`), not a string",
            ),
            (
                r#"{"input": [1, 2]}"#,
                "`input` must be a JSON object of keyword arguments (the workflow runs as \
                 `run(**input)`), not an array",
            ),
            (
                r#"{"input": "{}", "session_id": 5}"#,
                "invalid request body: invalid type: integer `5`",
            ),
        ] {
            let (status, _, answer) = call(&app, post_json(&uri, body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{route} {body}: {answer}");
            assert!(detail(&answer).starts_with(expected), "{body}: {answer}");
        }
    }
    let (_, _, tasks) = call(&app, get("/deployments/inputs/tasks")).await;
    assert_eq!(tasks, json!([]), "no task was created");
    // Objects, as a JSON string or as they are, and no input at all, are fine.
    for body in [r#"{"input": "{\"a\": 1}"}"#, r#"{"input": {"a": 1}}"#, "{}"] {
        let (status, _, answer) =
            call(&app, post_json("/deployments/inputs/tasks/create", body)).await;
        assert_eq!(status, StatusCode::OK, "{body}: {answer}");
    }
    fixture.shutdown().await;
}

#[tokio::test]
async fn task_lists_page_in_order_with_a_link_to_the_next_page() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    fixture.deploy_sleeper(&app, "paged").await;
    for n in 0..250 {
        let body = json!({ "input": json!({ "n": n }).to_string() }).to_string();
        let (status, _, answer) =
            call(&app, post_json("/deployments/paged/tasks/create", &body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    // Without paging parameters: the whole plain list, as llama_deploy's clients read it.
    let (status, headers, all) = call(&app, get("/deployments/paged/tasks")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("link").is_none());
    let all: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 250);

    let mut paged = Vec::new();
    let mut uri = "/deployments/paged/tasks?limit=100".to_owned();
    let mut sizes = Vec::new();
    loop {
        let (status, headers, page) = call(&app, get(&uri)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page = page.as_array().expect("a plain list").clone();
        sizes.push(page.len());
        paged.extend(
            page.iter()
                .map(|t| t["task_id"].as_str().unwrap().to_owned()),
        );
        let Some(link) = headers.get("link") else {
            break;
        };
        let link = link.to_str().unwrap();
        let last = paged.last().unwrap();
        assert_eq!(
            link,
            format!("</deployments/paged/tasks?after={last}&limit=100>; rel=\"next\"")
        );
        uri = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(target, _)| target.to_owned())
            .unwrap();
    }
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(paged, all, "every task once, in order");

    // `after` alone: pages of 100.
    let (_, headers, page) = call(
        &app,
        get(&format!("/deployments/paged/tasks?after={}", all[9])),
    )
    .await;
    assert_eq!(page.as_array().unwrap().len(), 100);
    assert_eq!(page[0]["task_id"], all[10]);
    assert!(
        headers
            .get("link")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("limit=100")
    );

    for (query, status, expected) in [
        (
            "limit=0",
            StatusCode::BAD_REQUEST,
            "`limit` must be from 1 to 1000, not 0",
        ),
        (
            "limit=1001",
            StatusCode::BAD_REQUEST,
            "`limit` must be from 1 to 1000, not 1001",
        ),
        (
            "limit=-1",
            StatusCode::BAD_REQUEST,
            "Failed to deserialize query string",
        ),
        ("after=nope", StatusCode::NOT_FOUND, "task `nope` not found"),
    ] {
        let (got, _, body) = call(&app, get(&format!("/deployments/paged/tasks?{query}"))).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(detail(&body).starts_with(expected), "{query}: {body}");
    }
    fixture.shutdown().await;
}

#[tokio::test]
async fn deleting_a_deployment_ends_waiting_runs_with_404_and_ends_event_streams() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    fixture.deploy_sleeper(&app, "doomed").await;
    let (_, _, task) = call(
        &app,
        post_json("/deployments/doomed/tasks/create", r#"{"input": "{}"}"#),
    )
    .await;
    let id = task["task_id"].as_str().unwrap();
    let events = app
        .clone()
        .oneshot(get(&format!("/deployments/doomed/tasks/{id}/events")))
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let stream = tokio::spawn(axum::body::to_bytes(events.into_body(), usize::MAX));
    let run = tokio::spawn({
        let app = app.clone();
        async move {
            call(
                &app,
                post_json("/deployments/doomed/tasks/run", r#"{"input": "{}"}"#),
            )
            .await
        }
    });
    // The run waits once its task exists.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, _, tasks) = call(&app, get("/deployments/doomed/tasks")).await;
            if tasks.as_array().is_some_and(|t| t.len() == 2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the run's task was never created");

    let (status, _, body) = call(
        &app,
        request("DELETE", "/deployments/doomed")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, _, body) = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the run still waits after its deployment was deleted")
        .unwrap();
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({ "detail": "Deployment not found" })
        )
    );
    tokio::time::timeout(Duration::from_secs(20), stream)
        .await
        .expect("the event stream is still open after its deployment was deleted")
        .unwrap()
        .unwrap();
    fixture.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_json_4xx_answers() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    let cases = [
        (get("/deployments/%FF"), StatusCode::BAD_REQUEST),
        (get("/nowhere"), StatusCode::NOT_FOUND),
        (
            request("PUT", "/status/").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            post_json("/deployments/create", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            request("POST", "/deployments/create")
                .header("content-type", "multipart/form-data")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            request("POST", "/deployments/create")
                .header("content-type", "multipart/form-data; boundary=b")
                .body(Body::from("--b--\r\n"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            post_json("/deployments/create", "name: [unclosed"),
            StatusCode::BAD_REQUEST,
        ),
        (
            get("/deployments/nope/tasks?limit=5"),
            StatusCode::NOT_FOUND,
        ),
        (
            get("/deployments/nope/tasks/t/events?after=x"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post_json("/deployments/nope/tasks/t/events", "[1]"),
            StatusCode::BAD_REQUEST,
        ),
        (
            request("POST", "/deployments/nope/sessions/delete")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (request, expected) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, _, body) = call(&app, request).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert!(body["detail"].is_string(), "{what}: {body}");
    }
    fixture.shutdown().await;
}

const FULL_TOKEN: &str = "full-token-0123456789abcdef";
const TASK_TOKEN: &str = "task-token-0123456789abcdef";

/// The options of a server that needs a token.
fn guarded() -> ApiOptions {
    use deployd_server::auth::Token;
    ApiOptions::new(LISTEN.parse().unwrap()).tokens(
        Some(Token::new(FULL_TOKEN).unwrap()),
        Some(Token::new(TASK_TOKEN).unwrap()),
    )
}

/// `request` with `Authorization: Bearer <token>`.
fn with_token(token: &str, method: &str, uri: &str) -> axum::http::request::Builder {
    request(method, uri).header("authorization", format!("Bearer {token}"))
}

#[tokio::test]
async fn with_a_token_every_route_but_the_health_check_needs_it() {
    let fixture = Fixture::new().await;
    let app = fixture.app(guarded(), LOOPBACK);
    fixture
        .deploy_sleeper(
            &fixture.app(ApiOptions::new(LISTEN.parse().unwrap()), LOOPBACK),
            "d",
        )
        .await;
    let routes = [
        ("GET", "/"),
        ("GET", "/deployments"),
        ("GET", "/deployments/"),
        ("POST", "/deployments/create"),
        ("GET", "/deployments/d"),
        ("DELETE", "/deployments/d"),
        ("DELETE", "/deployments/d/delete"),
        ("GET", "/deployments/d/tasks"),
        ("POST", "/deployments/d/tasks/create"),
        ("POST", "/deployments/d/tasks/run"),
        ("GET", "/deployments/d/tasks/t/results"),
        ("GET", "/deployments/d/tasks/t/events"),
        ("POST", "/deployments/d/tasks/t/events"),
        ("GET", "/deployments/d/sessions"),
        ("POST", "/deployments/d/sessions/create"),
        ("POST", "/deployments/d/sessions/delete"),
        ("GET", "/deployments/d/sessions/s"),
        ("GET", "/nowhere"),
    ];
    // And every route of the OpenAPI document but the health check.
    let documented = documented_routes();
    let routes = routes
        .iter()
        .map(|(method, uri)| ((*method).to_owned(), (*uri).to_owned()))
        .chain(documented.into_iter().filter(|(_, uri)| uri != "/status/"))
        .collect::<Vec<_>>();
    let wrong = [
        None,
        Some(format!("Bearer {FULL_TOKEN}x")),
        Some("Bearer ".to_owned()),
        Some(format!("Basic {FULL_TOKEN}")),
        Some(FULL_TOKEN.to_owned()),
    ];
    for (method, uri) in &routes {
        for authorization in &wrong {
            let mut builder = request(method, uri).header("content-type", "application/json");
            if let Some(value) = authorization {
                builder = builder.header("authorization", value);
            }
            let (status, headers, body) = call(&app, builder.body(Body::from("{}")).unwrap()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} {authorization:?}: {body}"
            );
            assert_eq!(headers["www-authenticate"], "Bearer realm=\"deployd\"");
            assert!(
                detail(&body).contains("token") || detail(&body).contains("Bearer"),
                "{body}"
            );
        }
    }
    // The deployment is still there: nothing refused touched it.
    let (status, _, _) = call(
        &app,
        with_token(FULL_TOKEN, "GET", "/deployments/d")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // The health check answers anyone, with nothing beyond health.
    let (status, _, body) = call(&app, get("/status/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "Healthy", "status_message": ""}));
    let (status, _, body) = call(
        &app,
        with_token(TASK_TOKEN, "GET", "/status/")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["deployments"], json!(["d"]), "{body}");
    fixture.shutdown().await;
}

#[tokio::test]
async fn the_task_token_runs_tasks_but_cannot_change_deployments() {
    let fixture = Fixture::new().await;
    let app = fixture.app(guarded(), LOOPBACK);
    let marker = fixture.project().join("started");
    let file = marker_file("mine", &marker);
    let deploy = |token: &str| {
        with_token(token, "POST", &fixture.create_url())
            .header("content-type", "application/json")
            .body(Body::from(file.clone()))
            .unwrap()
    };
    let (status, _, body) = call(&app, deploy(TASK_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(detail(&body).contains("task token"), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!marker.exists(), "the task token deployed");
    let (status, _, body) = call(&app, deploy(FULL_TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_file(&marker).await;

    let reload = with_token(
        TASK_TOKEN,
        "POST",
        &format!("{}&reload=true", fixture.create_url()),
    )
    .header("content-type", "application/json")
    .body(Body::from(file.clone()))
    .unwrap();
    assert_eq!(call(&app, reload).await.0, StatusCode::FORBIDDEN);
    for uri in ["/deployments/mine", "/deployments/mine/delete"] {
        let (status, _, body) = call(
            &app,
            with_token(TASK_TOKEN, "DELETE", uri)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {body}");
    }

    // What the task token may do.
    let (status, _, body) = call(
        &app,
        with_token(TASK_TOKEN, "GET", "/deployments/mine")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, task) = call(
        &app,
        with_token(TASK_TOKEN, "POST", "/deployments/mine/tasks/create")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"input": "{}"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{task}");
    let (status, _, tasks) = call(
        &app,
        with_token(TASK_TOKEN, "GET", "/deployments/mine/tasks")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tasks.as_array().map(Vec::len), Some(1), "{tasks}");
    let (status, _, session) = call(
        &app,
        with_token(TASK_TOKEN, "POST", "/deployments/mine/sessions/create")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{session}");

    // The full token deletes.
    let (status, _, body) = call(
        &app,
        with_token(FULL_TOKEN, "DELETE", "/deployments/mine")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    fixture.shutdown().await;
}

#[tokio::test]
async fn the_client_sends_its_token() {
    let fixture = Fixture::new().await;
    let (address, _stop) = serve(&fixture.manager, |address| {
        use deployd_server::auth::Token;
        ApiOptions::new(address).tokens(Some(Token::new(FULL_TOKEN).unwrap()), None)
    })
    .await;
    let base = format!("http://{address}");
    let without = Client::new(&base).deployment("x").await.unwrap_err();
    assert!(without.to_string().contains("HTTP 401"), "{without}");
    let wrong = Client::new(&base)
        .with_token("wrong-token-0123456789")
        .deployment("x")
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("HTTP 401"), "{wrong}");
    let with = Client::new(&base)
        .with_token(FULL_TOKEN)
        .deployment("x")
        .await
        .unwrap_err();
    assert!(with.to_string().contains("HTTP 404"), "{with}");
    let status = Client::new(&base)
        .with_token(FULL_TOKEN)
        .status()
        .await
        .unwrap();
    assert_eq!(status.deployments, Some(Vec::new()));
    fixture.shutdown().await;
}

#[tokio::test]
async fn pages_of_a_cors_origin_may_call_the_api_and_others_may_not() {
    let fixture = Fixture::new().await;
    let options = guarded().allow_cors_origin("https://app.example".parse().unwrap());
    let app = fixture.app(options, LOOPBACK);
    fixture
        .deploy_sleeper(
            &fixture.app(ApiOptions::new(LISTEN.parse().unwrap()), LOOPBACK),
            "d",
        )
        .await;

    // The preflight of a JSON POST with the token: answered without the token.
    let preflight = |origin: &str| {
        request("OPTIONS", "/deployments/d/tasks/create")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let (status, headers, _) = call(&app, preflight("https://app.example")).await;
    assert!(status.is_success(), "{status}");
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert!(headers.get("access-control-allow-credentials").is_none());
    let (_, headers, _) = call(&app, preflight("https://evil.example")).await;
    assert!(headers.get("access-control-allow-origin").is_none());

    // The POST itself, from the page, with the task token.
    let post = |origin: &str| {
        with_token(TASK_TOKEN, "POST", "/deployments/d/tasks/create")
            .header("origin", origin)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"input": "{}"}"#))
            .unwrap()
    };
    let (status, headers, body) = call(&app, post("https://app.example")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    let (status, headers, body) = call(&app, post("https://evil.example")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(headers.get("access-control-allow-origin").is_none());
    // Still no way in without the token.
    let (status, _, _) = call(
        &app,
        request("GET", "/deployments/d")
            .header("origin", "https://app.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Without `--cors-origin`, no CORS answers at all.
    let plain = fixture.app(guarded(), LOOPBACK);
    let (_, headers, _) = call(&plain, preflight("https://app.example")).await;
    assert!(headers.get("access-control-allow-origin").is_none());
    let (status, _, _) = call(&plain, post("https://app.example")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    fixture.shutdown().await;
}

#[tokio::test]
async fn event_streams_past_the_limit_get_429_and_bodies_past_theirs_413() {
    let fixture = Fixture::new().await;
    fixture.deploy_sleeper(&fixture.local(), "d").await;
    let (address, _stop) = serve(&fixture.manager, |address| {
        ApiOptions::new(address).max_streams(2).max_body_bytes(2048)
    })
    .await;
    let base = format!("http://{address}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let task: Value = http
        .post(format!("{base}/deployments/d/tasks/create"))
        .json(&json!({"input": "{}"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = format!(
        "{base}/deployments/d/tasks/{}/events",
        task["task_id"].as_str().unwrap()
    );
    // The task waits for a service that never gets ready: its streams stay open.
    let first = http.get(&events).send().await.unwrap();
    let second = http
        .get(&events)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = http.get(&events).send().await.unwrap();
    assert_eq!(third.status().as_u16(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let body: Value = third.json().await.unwrap();
    assert!(detail(&body).contains("too many event streams"), "{body}");
    // A closed stream frees its place.
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        let answer = http.get(&events).send().await.unwrap();
        if answer.status().as_u16() == 200 {
            reopened = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed stream kept its place");

    let answer = http
        .post(format!("{base}/deployments/d/tasks/create"))
        .json(&json!({"input": serde_json::to_string(&json!({"x": "y".repeat(4096)})).unwrap()}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 413);
    let body: Value = answer.json().await.unwrap();
    assert!(detail(&body).contains("length limit"), "{body}");
    drop((second, reopened));
    fixture.shutdown().await;
}

/// Every operation of the OpenAPI document as (method, URI), its parameters filled in: the
/// deployment `d`, its service `svc`, the task `t`, the session `s`.
fn documented_routes() -> Vec<(String, String)> {
    let doc = serde_json::to_value(deployd_server::openapi_document()).unwrap();
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let uri = path
            .replace("{name}", "d")
            .replace("{service}", "svc")
            .replace("{task_id}", "t")
            .replace("{session_id}", "s")
            .replace("{revision}", "1")
            .replace("{path}", "index.html");
        assert!(!uri.contains('{'), "a parameter is not filled in: {path}");
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), uri.clone()));
        }
    }
    routes
}

/// The routes the table of docs/http-api.md lists, as (method, path with `{}` for each
/// parameter).
fn routes_in_http_api_md() -> std::collections::BTreeSet<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/http-api.md");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (method, route) = (cells.get(1)?, cells.get(2)?);
            if !matches!(*method, "GET" | "POST" | "DELETE") {
                return None;
            }
            Some(((*method).to_owned(), generic(route.trim_matches('`'))))
        })
        .collect()
}

/// A path with each `{parameter}` written `{}`.
fn generic(path: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            c if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn the_openapi_document_and_docs_http_api_md_list_the_same_routes() {
    let doc = serde_json::to_value(deployd_server::openapi_document()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(|method| (method.to_uppercase(), generic(path)))
                .collect::<Vec<_>>()
        })
        .collect();
    let in_markdown = routes_in_http_api_md();
    let missing: Vec<_> = documented.difference(&in_markdown).collect();
    let extra: Vec<_> = in_markdown.difference(&documented).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/http-api.md and the OpenAPI document differ: not in the markdown {missing:?}; \
         not in the OpenAPI document {extra:?}"
    );
    // Every operation says what its errors look like.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.contains_key("200"), "{method} {path}");
            // Every route needs the token but the health check, which answers anyone.
            assert_eq!(
                responses.contains_key("401"),
                path != "/status/",
                "{method} {path}"
            );
            if path.contains('{') {
                assert_eq!(
                    responses["404"]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path}"
                );
            }
        }
    }
}

/// The TypeScript client's types are generated from `sdk/typescript/openapi.json`: it must be
/// the document the server serves (regenerate with `npm run fetch-openapi && npm run generate`
/// in `sdk/typescript`).
#[test]
fn the_typescript_client_is_generated_from_the_current_openapi_document() {
    let doc = serde_json::to_value(deployd_server::openapi_document()).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/typescript/openapi.json");
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        doc == committed,
        "sdk/typescript/openapi.json is not the server's OpenAPI document: in sdk/typescript run \
         `DEPLOYD_BIN=$PWD/../../target/debug/deployd npm run fetch-openapi && npm run generate`"
    );
    let schema = std::fs::read_to_string(path.with_file_name("src").join("schema.ts")).unwrap();
    for route in doc["paths"].as_object().unwrap().keys() {
        assert!(
            schema.contains(&format!("\"{route}\"")),
            "src/schema.ts has no {route}: regenerate it (npm run generate)"
        );
    }
}

#[tokio::test]
async fn every_route_of_the_openapi_document_is_served() {
    let fixture = Fixture::new().await;
    let app = fixture.app(
        ApiOptions::new(LISTEN.parse().unwrap()).run_timeout(Duration::from_millis(200)),
        LOOPBACK,
    );
    fixture.deploy_sleeper(&app, "d").await;
    let mut routes = documented_routes();
    // The delete last: the other routes need the deployment.
    routes.sort_by_key(|(method, _)| method == "DELETE");
    assert!(routes.len() >= 20, "{routes:?}");
    for (method, uri) in routes {
        let uri = match uri.as_str() {
            "/deployments/create" => fixture.create_url(),
            _ => uri,
        };
        let builder = request(&method, &uri).header("content-type", "application/json");
        let body = if uri.starts_with("/deployments/create") {
            "name: other\nservices:\n  svc:\n    command: sleep 600\n"
        } else {
            "{}"
        };
        let response = app
            .clone()
            .oneshot(builder.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        // Not the fallbacks of an unrouted path or method.
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {text}"
        );
        assert!(
            !(status == StatusCode::NOT_FOUND && text.contains("\"Not Found\"")),
            "{method} {uri} is not routed: {text}"
        );
        assert!(
            status.as_u16() < 500 || status.as_u16() == 504,
            "{method} {uri}: {status} {text}"
        );
        match uri.as_str() {
            "/docs" => {
                assert!(content_type.starts_with("text/html"), "{content_type}");
                assert!(text.contains("/deployments/{name}/tasks/run"), "{text}");
            }
            "/openapi.json" => {
                let doc: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(doc["openapi"], "3.1.0");
            }
            "/" => {
                let root: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(root["swagger_docs"], format!("http://{LISTEN}/docs"));
                assert_eq!(root["status"], format!("http://{LISTEN}/status"));
            }
            _ => {}
        }
    }
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_ui_that_does_not_answer_is_a_502_and_a_deployment_without_one_a_404() {
    let fixture = Fixture::new().await;
    let app = fixture.local();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = format!(
        "name: d\nservices:\n  svc:\n    command: sleep 600\nui:\n  port: {port}\n  build: [\"true\"]\n  command: sleep 600\n"
    );
    let (status, _, body) = call(&app, post_json(&fixture.create_url(), &file)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !body["warnings"].to_string().contains("UI"),
        "the UI is served: {body}"
    );
    for method in ["GET", "POST"] {
        let request = request(method, "/deployments/d/ui/page?x=1")
            .header("content-type", "text/plain")
            .body(Body::from("form"))
            .unwrap();
        let (status, _, body) = call(&app, request).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{method}: {body}");
        assert!(
            detail(&body).contains("UI of deployment `d`")
                && detail(&body).contains(&port.to_string()),
            "{body}"
        );
    }
    fixture.deploy_sleeper(&app, "plain").await;
    let (status, _, body) = call(&app, get("/deployments/plain/ui")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(detail(&body), "Deployment has no ui configured");
    // A body of a type the API refuses is still refused outside the UI.
    let request = request("POST", "/deployments/plain/tasks/create")
        .header("content-type", "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, _) = call(&app, request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_deployment_file_past_the_limit_is_a_413_naming_it() {
    let fixture = Fixture::new().await;
    let app = fixture.app(
        ApiOptions::new(LISTEN.parse().unwrap()).max_file_bytes(2048),
        LOOPBACK,
    );
    let mut file = "name: big\nservices:\n  svc:\n    command: sleep 600\n".to_owned();
    let small = file.clone();
    file.push_str(&format!("# {}\n", "x".repeat(4096)));
    let (status, _, body) = call(&app, post_json(&fixture.create_url(), &file)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        detail(&body).contains("deployment.yaml") && detail(&body).contains("2048"),
        "{body}"
    );
    // Nothing was deployed; a file within the limit is.
    let (status, _, _) = call(&app, get("/deployments/big")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = call(&app, post_json(&fixture.create_url(), &small)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    fixture.shutdown().await;
}
