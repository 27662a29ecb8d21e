"""A scripted OpenAI-compatible chat server on 127.0.0.1, for testing the synthesis client for real.

Each request pops the next scripted `Failure` (if any) and otherwise answers a chat completion after a
fixed latency. The server records every request body and header, and the most requests in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Failure:
    """One scripted failure: an error status (with headers and body), a hang, or a garbled 200."""

    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "scripted failure"}}'
    hang: bool = False  # never answer (until the server stops): the client must time out
    garbled: bool = False  # 200 with a body that is not JSON


class ChatServer:
    """Start with `with ChatServer() as server:`; point the client at `server.base_url`."""

    def __init__(self, latency_s: float = 0.0, content: str = '{"ok": true}', prompt_tokens: int = 120,
                 completion_tokens: int = 30):
        self.latency_s = latency_s
        self.content = content
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.script: deque[Failure] = deque()
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []  # names lower-cased
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections: set[tuple[str, int]] = set()  # client addresses: one per TCP connection
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 keeps connections open between requests, as real servers (vLLM, OpenAI) do; every
            # answer carries a Content-Length, so the client knows where one response ends.
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed ACK

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.times.append(time.monotonic())
                    server.connections.add(self.client_address)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failure = server.script.popleft() if server.script else None
                try:
                    if self.path != "/v1/chat/completions":
                        self._send(404, '{"error": {"message": "no such route"}}')
                    elif failure is None:
                        time.sleep(server.latency_s)
                        self._send(200, json.dumps(server._completion(body)))
                    elif failure.hang:
                        self.close_connection = True
                        server._stopping.wait(30)
                    elif failure.garbled:
                        self._send(200, '{"choices": [{"mess')
                    else:
                        self._send(failure.status, failure.body, failure.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on us (a timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _completion(self, request: dict) -> dict:
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": request.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.content}}],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
        }
