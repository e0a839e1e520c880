"""A webhook receiver that checks signatures with the `standardwebhooks` package from PyPI
(the Standard Webhooks project's Python implementation), for Shoal's webhook tests.

Usage: webhook_receiver.py SECRET — listens on 127.0.0.1 on a free port and prints the port
on its first line of output. Every POST is verified against SECRET first: a bad or missing
signature answers 401. Then the path decides:

  /ok                      204
  /status/CODE             CODE (with `Retry-After: N` when ?retry_after=N)
  /sequence/NAME?codes=... the next code of the list per NAME (the last one repeats)
  /hang?seconds=S          waits S seconds, then 204

GET /log returns every POST received, in order, as JSON:
  [{"path", "id", "timestamp", "verified", "body", "received_at"}].
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

LOCK = threading.Lock()
LOG = []
SEQUENCES = {}


class Handler(BaseHTTPRequestHandler):
    webhook = None

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/log":
            with LOCK:
                body = json.dumps(LOG).encode()
            self.reply(200, body, [("Content-Type", "application/json")])
        else:
            self.reply(404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        url = urlparse(self.path)
        query = parse_qs(url.query)
        try:
            self.webhook.verify(body, dict(self.headers.items()), json_parse=False)
            verified = True
        except WebhookVerificationError:
            verified = False
        with LOCK:
            LOG.append({
                "path": url.path,
                "id": self.headers.get("webhook-id"),
                "timestamp": self.headers.get("webhook-timestamp"),
                "verified": verified,
                "body": body.decode("utf-8", "replace"),
                "received_at": time.time(),
            })
        if not verified:
            return self.reply(401, b"signature does not verify")
        parts = url.path.strip("/").split("/")
        if parts == ["ok"]:
            return self.reply(204)
        if len(parts) == 2 and parts[0] == "status":
            headers = [("Retry-After", query["retry_after"][0])] if "retry_after" in query else []
            return self.reply(int(parts[1]), b"status as asked", headers)
        if len(parts) == 2 and parts[0] == "sequence":
            codes = [int(c) for c in query.get("codes", ["200"])[0].split(",")]
            with LOCK:
                n = SEQUENCES.get(parts[1], 0)
                SEQUENCES[parts[1]] = n + 1
            return self.reply(codes[min(n, len(codes) - 1)], b"in sequence")
        if parts == ["hang"]:
            time.sleep(float(query.get("seconds", ["30"])[0]))
            return self.reply(204)
        self.reply(404, b"no such behaviour")


def main():
    Handler.webhook = Webhook(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
