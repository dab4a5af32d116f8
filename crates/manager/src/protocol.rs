//! The service protocol, deployd's side: `POST /tasks`, then NDJSON events and one outcome.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest line a service may send.
const MAX_LINE: usize = 16 * 1024 * 1024;

/// The body of `POST /tasks`.
#[derive(Debug, Serialize)]
pub(crate) struct TaskRequest<'a> {
    pub(crate) task_id: &'a str,
    pub(crate) session_id: &'a str,
    pub(crate) attempt: u32,
    pub(crate) input: &'a Value,
    pub(crate) state: Option<&'a Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Event {
        #[serde(default)]
        data: Value,
    },
    Result {
        #[serde(default)]
        data: Value,
        #[serde(default)]
        state: Option<Value>,
    },
    Error {
        #[serde(default)]
        message: Option<String>,
    },
}

/// How a task ended, as the service said.
#[derive(Debug)]
pub(crate) enum Outcome {
    Result { data: Value, state: Option<Value> },
    Error(String),
}

/// Why a call did not give an outcome.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The service could not be reached or the exchange broke off: worth another attempt.
    #[error("{0}")]
    Transient(String),
    /// The service answered something that is not the protocol: not worth another attempt.
    #[error("the service broke the protocol: {0}")]
    Protocol(String),
    /// Recording an event failed.
    #[error(transparent)]
    Sink(crate::Error),
}

/// `http://127.0.0.1:{port}/tasks`, parsed once per thread and port (parsing a URL, host and
/// all, for every task showed in the task path's profile).
fn tasks_url(port: u16) -> Result<reqwest::Url, CallError> {
    thread_local! {
        static URL: std::cell::RefCell<Option<(u16, reqwest::Url)>> =
            const { std::cell::RefCell::new(None) };
    }
    URL.with_borrow_mut(|cached| match cached {
        Some((known, url)) if *known == port => Ok(url.clone()),
        _ => {
            let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/tasks"))
                .map_err(|err| CallError::Transient(format!("the service's URL: {err}")))?;
            *cached = Some((port, url.clone()));
            Ok(url)
        }
    })
}

/// Sends a task to the service on `port` and hands every event to `on_event` as it comes;
/// with `traceparent`, the W3C trace context of the call goes with it.
///
/// The service must start its answer (send the response head) within `head_timeout`; a service
/// that takes the connection and never answers is then given up on (and the task retried).
pub(crate) async fn call<F, Fut>(
    client: &reqwest::Client,
    port: u16,
    head_timeout: Duration,
    request: &TaskRequest<'_>,
    traceparent: Option<&str>,
    mut on_event: F,
) -> Result<Outcome, CallError>
where
    F: FnMut(Value) -> Fut,
    Fut: Future<Output = Result<(), crate::Error>>,
{
    let mut send = client.post(tasks_url(port)?).json(request);
    if let Some(traceparent) = traceparent {
        send = send.header(crate::trace::TRACEPARENT, traceparent);
    }
    let send = send.send();
    let response = tokio::time::timeout(head_timeout, send)
        .await
        .map_err(|_| {
            CallError::Transient(format!(
                "the service did not start its answer within {head_timeout:?}"
            ))
        })?
        .map_err(|err| CallError::Transient(format!("cannot reach the service: {err}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let body: String = body.chars().take(500).collect();
        let message = format!("POST /tasks answered {status}: {body}");
        return Err(if status.is_server_error() {
            CallError::Transient(message)
        } else {
            CallError::Protocol(message)
        });
    }
    let mut body = response.bytes_stream();
    let mut buffer = BytesMut::new();
    let mut ended = false;
    loop {
        while let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
            let line = buffer.split_to(newline + 1);
            let line = &line[..newline];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Line>(line) {
                Ok(Line::Event { data }) => on_event(data).await.map_err(CallError::Sink)?,
                Ok(Line::Result { data, state }) => return Ok(Outcome::Result { data, state }),
                Ok(Line::Error { message }) => {
                    return Ok(Outcome::Error(
                        message.unwrap_or_else(|| "the service reported an error".to_owned()),
                    ));
                }
                Err(err) => {
                    let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                    return Err(CallError::Protocol(format!(
                        "invalid line `{shown}`: {err}"
                    )));
                }
            }
        }
        if ended {
            return Err(if buffer.is_empty() {
                CallError::Transient("the service closed the stream before the result".to_owned())
            } else {
                CallError::Transient("the stream ended in the middle of a line".to_owned())
            });
        }
        if buffer.len() > MAX_LINE {
            return Err(CallError::Protocol(format!(
                "a line is longer than {MAX_LINE} bytes"
            )));
        }
        match body.next().await {
            Some(Ok(chunk)) => buffer.extend_from_slice(chunk.chunk()),
            Some(Err(err)) => {
                return Err(CallError::Transient(format!("the stream broke off: {err}")));
            }
            None => {
                ended = true;
                // A last line without a newline still counts.
                if !buffer.is_empty() && !buffer.ends_with(b"\n") {
                    buffer.extend_from_slice(b"\n");
                }
            }
        }
    }
}

/// Delivers an event to a running task: `POST /tasks/{task_id}/events` with `{"data": ...}`.
pub(crate) async fn send_event(port: u16, task_id: &str, data: Value) -> Result<(), crate::Error> {
    let response = shared_client()
        .post(format!("http://127.0.0.1:{port}/tasks/{task_id}/events"))
        .timeout(Duration::from_secs(30))
        .json(&serde_json::json!({ "data": data }))
        .send()
        .await
        .map_err(|err| crate::Error::Unavailable(format!("cannot reach the service: {err}")))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(500)
        .collect();
    Err(if status == reqwest::StatusCode::NOT_FOUND {
        crate::Error::Conflict(format!(
            "the service answered 404 to the event: it runs no task `{task_id}` that waits for \
             one, or it takes no events (POST /tasks/{{task_id}}/events)"
        ))
    } else {
        crate::Error::Unavailable(format!(
            "the service answered {status} to the event: {body}"
        ))
    })
}

/// Asks a service to stop a running task: `POST /tasks/{task_id}/cancel`. A service without
/// the route (`404`/`405`) is not an error the caller can act on: its call is abandoned.
pub(crate) async fn cancel(port: u16, task_id: &str) -> Result<(), crate::Error> {
    let response = shared_client()
        .post(format!("http://127.0.0.1:{port}/tasks/{task_id}/cancel"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|err| crate::Error::Unavailable(format!("cannot reach the service: {err}")))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(crate::Error::Unavailable(format!(
            "the service answered {status} to the cancel"
        )))
    }
}

/// `GET /graph` of a service (a graph service, see `deployd_graph::service`): its diagram in
/// Mermaid, with `task_id`'s run drawn over it when given. A service without the route is a
/// not-found naming it.
pub(crate) async fn graph(
    port: u16,
    service: &str,
    task_id: Option<&str>,
) -> Result<String, crate::Error> {
    let mut request = shared_client()
        .get(format!("http://127.0.0.1:{port}/graph"))
        .timeout(Duration::from_secs(30));
    if let Some(task) = task_id {
        request = request.query(&[("task_id", task)]);
    }
    let response = request
        .send()
        .await
        .map_err(|err| crate::Error::Unavailable(format!("cannot reach the service: {err}")))?;
    let status = response.status();
    let body: String = response.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(body);
    }
    let said: String = body.chars().take(500).collect();
    Err(match (status, task_id) {
        (reqwest::StatusCode::NOT_FOUND, Some(task)) if said.contains("run") => {
            crate::Error::NotFound {
                what: "graph run of task",
                name: task.to_owned(),
            }
        }
        (reqwest::StatusCode::NOT_FOUND, _) => crate::Error::NotFound {
            what: "graph of service",
            name: service.to_owned(),
        },
        _ => crate::Error::Unavailable(format!(
            "service `{service}` answered {status} to GET /graph: {said}"
        )),
    })
}

/// The HTTP client used to talk to services. It keeps connections alive between calls (a
/// service that speaks HTTP/1.1 is not reconnected for every task).
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .unwrap_or_default()
}

/// One [`client`] for the calls that are not a worker's.
fn shared_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(client)
}

#[cfg(test)]
mod tests {
    //! The client side against a scripted peer; the real services are exercised end to end in
    //! `tests/scenarios`.

    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves one connection with `response` (raw HTTP) and returns the port.
    async fn peer(response: &'static str) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0; 65536];
            let _ = socket.read(&mut buffer).await;
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
        });
        port
    }

    async fn check(response: &'static str) -> (Result<Outcome, CallError>, Vec<Value>) {
        let port = peer(response).await;
        let events = Arc::new(Mutex::new(Vec::new()));
        let input = json!({});
        let request = request(&input);
        let sink = Arc::clone(&events);
        let outcome = call(
            &client(),
            port,
            Duration::from_secs(5),
            &request,
            None,
            move |data| {
                sink.lock().unwrap().push(data);
                async { Ok(()) }
            },
        )
        .await;
        let events = events.lock().unwrap().clone();
        (outcome, events)
    }

    /// Task `t` of session `s`, first attempt, no state.
    fn request(input: &Value) -> TaskRequest<'_> {
        TaskRequest {
            task_id: "t",
            session_id: "s",
            attempt: 1,
            input,
            state: None,
        }
    }

    const OK: &str = "HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n";

    #[tokio::test]
    async fn events_then_result() {
        let response = Box::leak(
            format!(
                "{OK}{}\n\n{}\n{}\n",
                r#"{"type":"event","data":{"n":1}}"#,
                r#"{"type":"event","data":{"n":2}}"#,
                r#"{"type":"result","data":"done","state":{"k":1}}"#
            )
            .into_boxed_str(),
        );
        let (outcome, events) = check(response).await;
        assert_eq!(events, [json!({"n": 1}), json!({"n": 2})]);
        match outcome {
            Ok(Outcome::Result { data, state }) => {
                assert_eq!(data, json!("done"));
                assert_eq!(state, Some(json!({"k": 1})));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn last_line_without_newline_counts() {
        let response =
            Box::leak(format!("{OK}{}", r#"{"type":"result","data":3}"#).into_boxed_str());
        assert!(matches!(
            check(response).await.0,
            Ok(Outcome::Result { .. })
        ));
    }

    #[tokio::test]
    async fn error_line_is_the_services_error() {
        let response =
            Box::leak(format!("{OK}{}\n", r#"{"type":"error","message":"boom"}"#).into_boxed_str());
        match check(response).await.0 {
            Ok(Outcome::Error(message)) => assert_eq!(message, "boom"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_cut_before_the_result_is_transient() {
        let response =
            Box::leak(format!("{OK}{}\n", r#"{"type":"event","data":1}"#).into_boxed_str());
        let (outcome, events) = check(response).await;
        assert_eq!(events, [json!(1)]);
        assert!(
            matches!(outcome, Err(CallError::Transient(_))),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn garbage_breaks_the_protocol() {
        let response = Box::leak(format!("{OK}not json\n").into_boxed_str());
        let outcome = check(response).await.0;
        assert!(
            matches!(&outcome, Err(CallError::Protocol(m)) if m.contains("not json")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn status_codes() {
        let outcome = check("HTTP/1.0 503 Busy\r\n\r\nlater").await.0;
        assert!(
            matches!(outcome, Err(CallError::Transient(_))),
            "{outcome:?}"
        );
        let outcome = check("HTTP/1.0 404 Not Found\r\n\r\n").await.0;
        assert!(
            matches!(outcome, Err(CallError::Protocol(_))),
            "{outcome:?}"
        );
    }

    /// A service that takes the connection and never answers is given up on once the head
    /// timeout passes (the probe saw a stuck connection stall a service for 32 s).
    #[tokio::test]
    async fn a_service_that_never_answers_is_given_up_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            // Holds the connection open without a byte of answer.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(socket);
        });
        let input = json!({});
        let request = request(&input);
        let outcome = call(
            &client(),
            port,
            Duration::from_millis(200),
            &request,
            None,
            |_| async { Ok(()) },
        )
        .await;
        assert!(
            matches!(&outcome, Err(CallError::Transient(m)) if m.contains("did not start its answer")),
            "{outcome:?}"
        );
        held.abort();
    }

    /// Calls to a service that keeps connections alive (HTTP/1.1) reuse one connection.
    #[tokio::test]
    async fn calls_reuse_a_kept_alive_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(Mutex::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                *counted.lock().unwrap() += 1;
                tokio::spawn(async move {
                    let mut buffer = vec![0; 65536];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buffer[..n]);
                        // One request per head and its small JSON body (sent in full).
                        let text = String::from_utf8_lossy(&seen).into_owned();
                        let Some(head_end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length: usize = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if seen.len() < head_end + 4 + length {
                            continue;
                        }
                        seen.drain(..head_end + 4 + length);
                        let body = "{\"type\":\"result\",\"data\":1}\n";
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let client = client();
        let input = json!({});
        let request = request(&input);
        for _ in 0..3 {
            let outcome = call(
                &client,
                port,
                Duration::from_secs(5),
                &request,
                None,
                |_| async { Ok(()) },
            )
            .await;
            assert!(matches!(outcome, Ok(Outcome::Result { .. })), "{outcome:?}");
        }
        assert_eq!(*connections.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn nobody_listening_is_transient() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let input = json!({});
        let request = request(&input);
        let outcome = call(
            &client(),
            port,
            Duration::from_secs(5),
            &request,
            None,
            |_| async { Ok(()) },
        )
        .await;
        assert!(
            matches!(outcome, Err(CallError::Transient(_))),
            "{outcome:?}"
        );
    }
}
