"""The floor for bench/creds.py: a bare ThreadingHTTPServer replaying canned responses.

``python3 bench/bare_server.py PORT RESPONSES.json`` where the JSON file maps a
path to ``{"status": int, "reason": str, "headers": [[name, value], ...],
"body": str}``, captured from local_endpoints.py so both send the same bytes.
HTTP/1.1 keep-alive, each response written in one piece; no routing, no
logging, no work: whatever local_endpoints.py does beyond this is its overhead.
Other paths get an empty 404 (which is also what answers conftest's readiness
probe of /health).
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def encode(response: dict) -> bytes:
    head = [f"HTTP/1.1 {response['status']} {response['reason']}"]
    head += [f"{name}: {value}" for name, value in response["headers"]]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response["body"].encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.wfile.write(self.server.responses.get(self.path, NOT_FOUND))

    def log_message(self, format, *args):
        pass


def main() -> None:
    port, responses_path = int(sys.argv[1]), sys.argv[2]
    with open(responses_path, encoding="utf-8") as f:
        responses = {path: encode(response) for path, response in json.load(f).items()}
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.responses = responses
    server.serve_forever()


if __name__ == "__main__":
    main()
