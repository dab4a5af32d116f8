"""An echo service speaking deployd's service protocol, with the standard library only.

GET  /healthz  -> 200 once the service can take tasks
POST /tasks    -> application/x-ndjson: two events, then the result
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def log_message(self, fmt, *args):
        sys.stderr.write("echo: " + (fmt % args) + "\n")

    def do_GET(self):
        if self.path == "/healthz":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')
        else:
            self.send_error(404)

    def do_POST(self):
        if self.path != "/tasks":
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length", "0"))
        task = json.loads(self.rfile.read(length) or b"{}")
        message = (task.get("input") or {}).get("message", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        self.line({"type": "event", "data": {"step": "received", "message": message}})
        time.sleep(0.05)
        self.line({"type": "event", "data": {"step": "echoing", "message": message}})
        self.line({"type": "result", "data": f"Message received: {message}"})

    def line(self, obj):
        self.wfile.write(json.dumps(obj).encode() + b"\n")
        self.wfile.flush()


def main():
    port = int(os.environ.get("PORT", "8000"))
    # A listen backlog for the tasks deployd sends at once (`max-concurrency`, 32 by default).
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"echo: listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
