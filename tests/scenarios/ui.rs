//! A deployment's UI (`ui:` in its file), as llama_deploy 0.9 runs it: its source synced, `pnpm
//! install` then `pnpm run dev` run and supervised with `PORT` and the Next.js base path set,
//! and `/deployments/{name}/ui/...` proxied to it: pages, form posts, streamed answers,
//! redirects and a WebSocket. The UI is `tests/fixtures/ui` (Node's standard library).

use std::io::Read;
use std::time::{Duration, Instant};

use deployd_e2e::{Project, Server, copy_dir, free_port, success, wait_for};
use serde_json::Value;

#[test]
fn a_deployment_s_ui_is_supervised_and_proxied_with_its_websocket() {
    let project = Project::new();
    copy_dir(
        &deployd_e2e::workspace().join("tests/fixtures/ui"),
        &project.path().join("ui"),
    );
    let ui_port = free_port();
    let file = project.write(
        "withui.yaml",
        &format!(
            "name: withui\nservices:\n  echo:\n    source:\n      type: local\n      location: src\n    \
             command: python3 echo.py\nui:\n  name: The UI\n  port: {ui_port}\n  source:\n    \
             type: local\n    location: ui\n"
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let deployed = success(&server.cli(&["deploy", file.to_str().unwrap()]));
    assert!(!deployed.contains("does not serve a UI"), "{deployed}");
    // Ready, or failed (pnpm missing, an install that failed): the wait ends either way.
    let status = wait_for("the UI to be ready", Duration::from_secs(240), || {
        let (_, status) = server.get("/deployments/withui").ok()?;
        matches!(status["ui"]["phase"].as_str(), Some("ready" | "failed")).then_some(status)
    });
    assert_eq!(status["ui"]["phase"], "ready", "{status}");
    assert_eq!(status["ui"]["id"], "@ui");
    assert_eq!(status["ui"]["port"], ui_port);
    assert_eq!(status["services"][0]["id"], "echo");

    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = |path: &str| format!("{}/deployments/withui/ui{path}", server.url);

    // The page, with the environment llama_deploy gives the UI.
    let page = http.get(url("")).send().unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-ui"], "yes");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(
        page.text().unwrap(),
        "<!doctype html><title>withui</title><h1>UI of withui at /deployments/withui/ui</h1>\n"
    );

    // A form post (a content type the API itself refuses), its query, headers and body.
    let echo: Value = http
        .post(url("/echo?a=1&b=two"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-custom", "kept")
        .header("connection", "keep-alive, x-custom-hop")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .body("name=value&other=1")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/deployments/withui/ui/echo");
    assert_eq!(echo["query"], "?a=1&b=two");
    assert_eq!(echo["body"], "name=value&other=1");
    let headers = &echo["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["host"], format!("127.0.0.1:{ui_port}"));
    assert_eq!(
        headers["x-forwarded-host"],
        server.url.trim_start_matches("http://")
    );
    assert!(headers.get("proxy-authorization").is_none(), "{headers}");
    assert_ne!(
        headers["connection"], "keep-alive, x-custom-hop",
        "{headers}"
    );

    // A request without a body reaches the UI without one; a body keeps its length.
    let plain: Value = http.get(url("/echo")).send().unwrap().json().unwrap();
    assert_eq!(plain["method"], "GET");
    assert!(
        plain["headers"].get("transfer-encoding").is_none(),
        "{plain}"
    );
    assert_eq!(plain["body"], "");
    assert_eq!(headers["content-length"], "18", "{headers}");

    // A streamed answer comes in pieces, as the UI writes them.
    let mut streamed = http.get(url("/stream")).send().unwrap();
    let started = Instant::now();
    let mut first = [0u8; 64];
    let n = streamed.read(&mut first).unwrap();
    let first_at = started.elapsed();
    assert_eq!(&first[..n], b"chunk 1\n");
    let mut rest = String::new();
    streamed.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "chunk 2\nchunk 3\n");
    assert!(
        started.elapsed() >= first_at + Duration::from_millis(300),
        "the chunks came together: {first_at:?} then {:?}",
        started.elapsed()
    );

    // A redirect comes back as it is.
    let redirect = http.get(url("/redirect")).send().unwrap();
    assert_eq!(redirect.status(), 302);
    assert_eq!(
        redirect.headers()["location"],
        "/deployments/withui/ui/echo"
    );

    // The UI's own 404 is its answer, not deployd's.
    let missing = http.get(url("/nothing-here")).send().unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.text().unwrap(), "no such page\n");

    // A WebSocket, with its subprotocol, echoing text and binary messages.
    let ws_url = format!(
        "{}/deployments/withui/ui/ws",
        server.url.replace("http://", "ws://")
    );
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(ws_url).unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat".parse().unwrap());
    let stream = std::net::TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (mut socket, answer) = tungstenite::client(request, stream).unwrap();
    assert_eq!(answer.headers()["sec-websocket-protocol"], "chat");
    for n in 0..3 {
        socket
            .send(tungstenite::Message::Text(format!("hello {n}").into()))
            .unwrap();
        assert_eq!(
            socket.read().unwrap(),
            tungstenite::Message::Text(format!("hello {n}").into())
        );
    }
    let bytes: Vec<u8> = (0..=255).collect();
    socket
        .send(tungstenite::Message::Binary(bytes.clone().into()))
        .unwrap();
    assert_eq!(
        socket.read().unwrap(),
        tungstenite::Message::Binary(bytes.into())
    );
    socket.close(None).unwrap();

    // A reload that changes nothing leaves the UI (and the service) running as they are.
    let before = server.get("/deployments/withui").unwrap().1["ui"]["pid"].clone();
    let echo_before = server.get("/deployments/withui").unwrap().1["services"][0]["pid"].clone();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("# reloaded\n{text}")).unwrap();
    success(&server.cli(&["deploy", "--reload", file.to_str().unwrap()]));
    let (_, status) = server.get("/deployments/withui").unwrap();
    assert_eq!(status["ui"]["pid"], before, "{status}");
    assert_eq!(status["services"][0]["pid"], echo_before, "{status}");

    // A reload of changed UI code replaces the UI: the new one serves on the same port.
    std::fs::write(project.path().join("ui/CHANGED"), "a change").unwrap();
    success(&server.cli(&["deploy", "--reload", file.to_str().unwrap()]));
    let status = wait_for("the new UI to be ready", Duration::from_secs(240), || {
        let (_, status) = server.get("/deployments/withui").ok()?;
        (status["ui"]["phase"] == "ready" && status["ui"]["pid"] != before).then_some(status)
    });
    assert_eq!(status["ui"]["port"], ui_port);
    let page = http.get(url("")).send().unwrap();
    assert_eq!(page.status(), 200);

    // The UI's output is its log.
    let log = success(&server.cli(&["logs", "withui", "@ui", "-n", "50"]));
    assert!(
        log.contains(&format!(
            "listening on {ui_port} under /deployments/withui/ui"
        )),
        "{log}"
    );

    // A deployment without a UI says so; deleting this one stops its UI.
    let (status, body) = server.get("/deployments/nope/ui").unwrap();
    assert_eq!(status, 404, "{body}");
    success(&server.cli(&["delete", "withui"]));
    wait_for("the UI to stop", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", ui_port))
            .is_err()
            .then_some(())
    });
}
