"""An echo service speaking deployd's service protocol, with the standard library only.

GET  /healthz  -> 200 once the service can take tasks
POST /tasks    -> application/x-ndjson: two events, then the result

HTTP/1.1: deployd keeps its connections to the service alive between tasks, and each
connection has a thread of its own (many tasks at once). The answer is chunked, one NDJSON
line per chunk, so each line reaches deployd as it is written.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; the streamed body is chunked

    def log_message(self, fmt, *args):
        sys.stderr.write("echo: " + (fmt % args) + "\n")

    def do_GET(self):
        if self.path == "/healthz":
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
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
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.line({"type": "event", "data": {"step": "received", "message": message}})
        time.sleep(0.05)
        self.line({"type": "event", "data": {"step": "echoing", "message": message}})
        self.line({"type": "result", "data": f"Message received: {message}"})
        self.wfile.write(b"0\r\n\r\n")  # the end of the body; the connection stays open
        self.wfile.flush()

    def line(self, obj):
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
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
