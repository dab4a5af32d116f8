//! A minimal native echo service for `cargo xtask bench`: deployd's service protocol over
//! HTTP/1.1 keep-alive, one thread per connection, standard library and serde_json only, so that
//! what a benchmark measures through it is deployd's own cost.
//!
//! `GET /healthz` answers 200; `POST /tasks` answers one event and the result
//! `"Message received: <input.message>"` as chunked NDJSON, in one write. Listens on
//! `127.0.0.1:$PORT`. With `ECHO_DELAY_MS`, each task waits that many milliseconds before it is
//! answered (a service that takes time: the cluster benchmark's).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() -> std::process::ExitCode {
    let port = match std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    {
        Some(port) => port,
        None => {
            eprintln!("echo-service: set PORT to the port to listen on");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("echo-service: cannot listen on 127.0.0.1:{port}: {err}");
            return std::process::ExitCode::from(1);
        }
    };
    eprintln!("echo-service: listening on 127.0.0.1:{port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    std::process::ExitCode::SUCCESS
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let delay = std::env::var("ECHO_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut length = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => writer.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}",
            )?,
            ("POST", "/tasks") => {
                if let Some(delay) = delay {
                    std::thread::sleep(delay);
                }
                let task: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let message = task["input"]["message"].as_str().unwrap_or_default();
                let event = serde_json::json!({"type": "event", "data": {"step": "received", "message": message}});
                let result = serde_json::json!({"type": "result", "data": format!("Message received: {message}")});
                let mut answer = Vec::with_capacity(512);
                answer.extend_from_slice(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                for line in [event, result] {
                    let text = format!("{line}\n");
                    answer.extend_from_slice(format!("{:x}\r\n{text}\r\n", text.len()).as_bytes());
                }
                answer.extend_from_slice(b"0\r\n\r\n");
                writer.write_all(&answer)?;
            }
            _ => writer.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"error\":\"no route\"}\n",
            )?,
        }
    }
}
