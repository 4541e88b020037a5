"""A stand-in OpenAI-compatible server for the judge tests: the standard library's http.server on
127.0.0.1 (port 0), in a thread, stopped by the test.

It serves GET /v1/models and POST /v1/chat/completions. By default every completion is a short
reason and a grade `[[n]]` derived from the prompt (deterministic); a request asking for logprobs
gets `top_logprobs` alternatives "m" / "M" (what alpaca_eval's weighted judge parses). Tests steer it
through `script`: a list of what the next chat requests get ("400", "429", "500", "noverdict", "drop": close
the connection without a reply), consumed in order; and `logprobs=False` (a server that gives none),
`stop_after` (shut down after that many chat requests: a server killed mid-evaluation).
Every request is recorded (`requests`: path, headers, JSON body).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn:
    def __init__(self, model: str = "judge-model", logprobs: bool = True, stop_after: int | None = None):
        self.model, self.logprobs, self.stop_after = model, logprobs, stop_after
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.chat_count = 0
        self.stopped = False
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                standin._record(self, None)
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": standin.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if standin.stopped:  # killed: kept-alive connections die too
                    self.close_connection = True
                    self.connection.close()
                    return
                standin._record(self, body)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                action = standin._next()
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action in ("400", "429", "500"):
                    return self._send(int(action), {"error": {"message": f"stand-in {action}", "type": "x"}})
                if standin._maybe_stop():
                    self.close_connection = True
                self._send(200, standin.completion(body, action))

            def _send(self, status, data):
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _record(self, handler, body):
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()}, "body": body})

    def _next(self) -> str:
        with self.lock:
            self.chat_count += 1
            return self.script.pop(0) if self.script else "ok"

    def _maybe_stop(self) -> bool:
        if self.stop_after is not None and self.chat_count >= self.stop_after:
            threading.Thread(target=self.stop, daemon=True).start()
            return True
        return False

    @property
    def chats(self) -> list[dict]:
        return [r for r in self.requests if r["body"] is not None]

    def completion(self, body: dict, action: str) -> dict:
        text_in = json.dumps(body.get("messages"), sort_keys=True)
        grade = 1 + int(hashlib.sha256(text_in.encode()).hexdigest(), 16) % 10
        text = "The answer has no grade here." if action == "noverdict" else f"Reasonable. Rating: [[{grade}]]"
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if body.get("logprobs") and self.logprobs:
            m = -0.2 if grade > 5 else -1.8  # P(m) ~ 0.82 or 0.17
            tops = [{"token": "m", "logprob": m, "bytes": None}, {"token": "M", "logprob": -3.0 if m > -1 else -0.2,
                                                                  "bytes": None}]
            choice["message"]["content"] = "m"
            choice["logprobs"] = {"content": [{"token": "m", "logprob": m, "bytes": None, "top_logprobs": tops}]}
        else:
            choice["logprobs"] = None
        return {"id": "standin", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [choice], "usage": {"prompt_tokens": 10 + len(text_in) // 10, "completion_tokens": 7,
                                               "total_tokens": 17 + len(text_in) // 10}}

    def stop(self):
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        self.server.shutdown()
        self.server.server_close()
