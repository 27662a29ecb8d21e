"""A scripted OpenAI-compatible chat server on 127.0.0.1, for testing the synthesis client for real.

Each request pops the next scripted `Failure` (if any) and otherwise answers a chat completion after a
fixed latency. The server records every request body and header, and the most requests in flight at once.
`BatchServer` adds the Batch API's files and batches endpoints.
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

            def do_GET(self) -> None:
                self._send(*server.route("GET", self.path, self.headers, b""))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/chat/completions":
                    self._send(*server.route("POST", self.path, self.headers, raw))
                    return
                body = json.loads(raw)
                with server._lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.times.append(time.monotonic())
                    server.connections.add(self.client_address)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failure = server.script.popleft() if server.script else None
                try:
                    if failure is None:
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

    def route(self, method: str, path: str, headers: object, raw: bytes) -> tuple[int, str]:
        """(status, body) of a request to another route than chat completions; here: none."""
        return 404, '{"error": {"message": "no such route"}}'

    def _completion(self, request: dict) -> dict:
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": request.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.content}}],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
        }


class BatchServer(ChatServer):
    """The Batch API: `/files` (multipart upload, list, content) and `/batches` (create, retrieve, list).

    Each retrieve moves a batch one state on: validating → in_progress → finalizing → its outcome, popped
    from `outcomes` when the batch was created (default "completed"). At the end the output file holds a
    chat completion (`_completion`) per answered request, and the error file a 400 for the ids in
    `request_errors`; an "expired" batch answers only its first `expired_answers` requests, the rest are
    `batch_expired` errors; a "failed" batch answers none and has no files. `scripted` failures apply to
    every route. Recorded: `uploads` (filename, custom_ids), `created` (batch id, custom_ids), `downloads`,
    `listings`.
    """

    def __init__(self, outcomes=(), expired_answers: int = 0, request_errors=(), **kwargs):
        super().__init__(**kwargs)
        self.outcomes = deque(outcomes)
        self.expired_answers = expired_answers
        self.request_errors = set(request_errors)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.uploads: list[tuple[str, list[str]]] = []
        self.created: list[tuple[str, list[str]]] = []
        self.downloads: list[str] = []
        self.listings = 0  # GET /files and /batches: only a resume after a kill should need them

    def route(self, method: str, path: str, headers, raw: bytes) -> tuple[int, str]:
        with self._lock:
            failure = self.script.popleft() if self.script else None
            if failure is not None:
                return failure.status, failure.body
            path, _, _ = path.partition("?")
            parts = path.removeprefix("/v1/").split("/")
            if parts == ["files"] and method == "POST":
                return 200, json.dumps(self._upload(headers["Content-Type"], raw))
            if parts == ["files"]:
                self.listings += 1
                return 200, json.dumps({"object": "list", "data": [self._file(i) for i in self.files],
                                        "has_more": False})
            if parts[0] == "files" and len(parts) == 3 and parts[1] in self.files:
                self.downloads.append(parts[1])
                return 200, self.files[parts[1]]["content"].decode()
            if parts == ["batches"] and method == "POST":
                return 200, json.dumps(self._create(json.loads(raw)))
            if parts == ["batches"]:
                self.listings += 1
                data = [self._batch(i) for i in reversed(self.batches)]  # newest first, as the API
                return 200, json.dumps({"object": "list", "data": data, "has_more": False})
            if parts[0] == "batches" and len(parts) == 2 and parts[1] in self.batches:
                self._advance(parts[1])
                return 200, json.dumps(self._batch(parts[1]))
            return 404, '{"error": {"message": "no such route"}}'

    def _upload(self, content_type: str, raw: bytes) -> dict:
        from email.parser import BytesParser
        from email.policy import default

        message = BytesParser(policy=default).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        upload = fields["file"]
        content = upload.get_payload(decode=True)
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = {"filename": upload.get_filename(), "content": content,
                               "purpose": fields["purpose"].get_content().strip()}
        ids = [json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]
        self.uploads.append((upload.get_filename(), ids))
        return self._file(file_id)

    def _file(self, file_id: str) -> dict:
        f = self.files[file_id]
        return {"id": file_id, "object": "file", "bytes": len(f["content"]), "created_at": 0,
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}

    def _create(self, request: dict) -> dict:
        batch_id = f"batch_{len(self.batches)}"
        lines = [json.loads(line) for line in self.files[request["input_file_id"]]["content"].splitlines()
                 if line.strip()]
        self.batches[batch_id] = {"request": request, "lines": lines, "status": "validating",
                                  "outcome": self.outcomes.popleft() if self.outcomes else "completed",
                                  "output_file_id": None, "error_file_id": None, "counts": None}
        self.created.append((batch_id, [line["custom_id"] for line in lines]))
        return self._batch(batch_id)

    def _advance(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        following = {"validating": "in_progress", "in_progress": "finalizing", "finalizing": batch["outcome"]}
        if batch["status"] not in following:
            return
        batch["status"] = following[batch["status"]]
        if batch["status"] in ("completed", "expired"):
            self._finish(batch_id, batch)

    def _finish(self, batch_id: str, batch: dict) -> None:
        answered = batch["lines"] if batch["status"] == "completed" else batch["lines"][:self.expired_answers]
        outputs, errors = [], []
        for n, line in enumerate(batch["lines"]):
            custom_id = line["custom_id"]
            if line not in answered:
                errors.append({"id": f"req-{n}", "custom_id": custom_id, "response": None,
                               "error": {"code": "batch_expired", "message": "expired before it ran"}})
            elif custom_id in self.request_errors:
                errors.append({"id": f"req-{n}", "custom_id": custom_id, "error": None, "response": {
                    "status_code": 400, "request_id": f"r{n}",
                    "body": {"error": {"message": "scripted bad request"}}}})
            else:
                self.requests.append(line["body"])
                outputs.append({"id": f"req-{n}", "custom_id": custom_id, "error": None, "response": {
                    "status_code": 200, "request_id": f"r{n}", "body": self._completion(line["body"])}})
        for key, rows in (("output_file_id", outputs), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{len(self.files)}"
                content = "".join(json.dumps(row) + "\n" for row in rows).encode()
                self.files[file_id] = {"filename": f"{batch_id}{key}.jsonl", "content": content,
                                       "purpose": "batch_output"}
                batch[key] = file_id
        batch["counts"] = {"total": len(batch["lines"]), "completed": len(outputs), "failed": len(errors)}

    def _batch(self, batch_id: str) -> dict:
        batch = self.batches[batch_id]
        return {"id": batch_id, "object": "batch", "endpoint": batch["request"]["endpoint"],
                "completion_window": batch["request"]["completion_window"],
                "input_file_id": batch["request"]["input_file_id"], "created_at": 0,
                "status": batch["status"], "metadata": batch["request"].get("metadata"),
                "output_file_id": batch["output_file_id"], "error_file_id": batch["error_file_id"],
                "request_counts": batch["counts"]}
