"""Fault servers for the cloud/hybrid tests: real sockets on 127.0.0.1, one thread per connection.

A ``FaultServer`` answers its n-th request with its n-th *behaviour* (the last one repeats), so a test can say
"500, then 500, then a good answer" and check the client's retries against what actually arrived on the wire.
The server records every connection and every request (headers and JSON body), which is how the tests prove
what a client sent - or that it sent nothing at all.

Behaviours are plain functions ``(conn, request) -> None`` that write raw bytes to the socket, so a test can
produce what no well-behaved framework would: a hang, a TCP reset, a truncated event stream.
"""
from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any                # parsed JSON, or the raw text when it is not JSON
    raw: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages", []) if isinstance(self.body, dict) else []

    @property
    def streaming(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


Behaviour = Callable[["_Conn", Request], None]


class _Conn:
    """What a behaviour gets: the socket plus the server's stop event."""

    def __init__(self, sock: socket.socket, stopping: threading.Event):
        self.sock = sock
        self.stopping = stopping

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def respond(self, status: int, body: bytes, *, content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "X")
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(head) + "\r\n\r\n").encode() + body)


# --- answers -------------------------------------------------------------------------------------
def completion_json(text: str, *, finish_reason: str = "stop", prompt_tokens: int = 5, chat: bool = True) -> bytes:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
              if chat else {"index": 0, "text": text, "finish_reason": finish_reason})
    return json.dumps({
        "id": "chatcmpl-test", "object": "chat.completion" if chat else "text_completion", "model": "fault-server",
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                  "total_tokens": prompt_tokens + len(text.split())},
    }).encode()


def sse_event(piece: str | None, finish_reason: str | None = None, chat: bool = True) -> bytes:
    if chat:
        choice = {"index": 0, "delta": {"content": piece} if piece is not None else {}, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason}
    event = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "fault-server", "choices": [choice]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _sse_head(conn: _Conn) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
              b"Connection: close\r\n\r\n")


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def ok(text: str = "The cloud says hello.") -> Behaviour:
    """A good answer: JSON, or an SSE stream when the request asks for one."""
    def behave(conn: _Conn, req: Request) -> None:
        chat = req.path.endswith("/chat/completions")
        if req.streaming:
            _sse_head(conn)
            for p in _pieces(text):
                conn.send(sse_event(p, chat=chat))
            conn.send(sse_event(None, "stop", chat=chat) + b"data: [DONE]\n\n")
        else:
            conn.respond(200, completion_json(text, chat=chat))
    return behave


def echo(prefix: str = "echo: ") -> Behaviour:
    """Answer with every message's content the server received, so a test can see what left the client."""
    def behave(conn: _Conn, req: Request) -> None:
        said = [m.get("content", "") for m in req.messages] if req.messages else [req.body.get("prompt", "")]
        ok(prefix + " | ".join(said))(conn, req)
    return behave


def status(code: int, *, retry_after: str | None = None, body: bytes = b'{"error": {"message": "nope"}}') -> Behaviour:
    def behave(conn: _Conn, req: Request) -> None:
        conn.respond(code, body, headers={"Retry-After": retry_after} if retry_after is not None else None)
    return behave


def hang() -> Behaviour:
    """Read the request, then say nothing until the server stops."""
    def behave(conn: _Conn, req: Request) -> None:
        conn.stopping.wait(60)
    return behave


def reset() -> Behaviour:
    """Read the request, then abort the connection with a TCP RST (SO_LINGER 0)."""
    def behave(conn: _Conn, req: Request) -> None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
    return behave


def malformed(body: bytes = b'{"choices": [{"message": {"content": "cut') -> Behaviour:
    """A 200 whose body is not valid JSON (or not a chat completion, for a JSON body)."""
    def behave(conn: _Conn, req: Request) -> None:
        conn.respond(200, body)
    return behave


def broken_stream(text: str = "one two three four", after: int = 2) -> Behaviour:
    """An SSE stream that sends ``after`` pieces and then drops the connection (no finish, no [DONE])."""
    def behave(conn: _Conn, req: Request) -> None:
        _sse_head(conn)
        for p in _pieces(text)[:after]:
            conn.send(sse_event(p))
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
    return behave


def garbage_stream(after: int = 1) -> Behaviour:
    """An SSE stream whose event after ``after`` good pieces is not JSON."""
    def behave(conn: _Conn, req: Request) -> None:
        _sse_head(conn)
        for p in _pieces("alpha beta gamma")[:after]:
            conn.send(sse_event(p))
        conn.send(b"data: {this is not json\n\n")
    return behave


# --- the server ----------------------------------------------------------------------------------
class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultServer:
    """Start with ``with FaultServer(status(500), ok()) as srv:``; point a client at ``srv.url``."""

    def __init__(self, *behaviours: Behaviour):
        self.behaviours = list(behaviours) or [ok()]
        self.requests: list[Request] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    outer.connections += 1
                req = _read_request(self.request)
                if req is None:
                    return
                with outer._lock:
                    index = len(outer.requests)
                    outer.requests.append(req)
                behaviour = outer.behaviours[min(index, len(outer.behaviours) - 1)]
                try:
                    behaviour(_Conn(self.request, outer._stopping), req)
                except OSError:
                    pass  # the client went away first: that is the client's business

        self._server = _TCPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> "FaultServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _read_request(sock: socket.socket) -> Request | None:
    sock.settimeout(10)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    except (OSError, ValueError):
        return None
    sock.settimeout(None)
    try:
        body: Any = json.loads(rest)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = rest.decode("utf-8", "replace")
    return Request(method=method, path=path, headers=headers, body=body, raw=head + b"\r\n\r\n" + rest)


def free_port_refusing() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


class ConnectionSpy:
    """Record every ``socket.connect`` this process makes while the spy is active (a PEP 578 audit hook).

    This is the proof behind "privacy mode opens no connection": it sees connects made by any library,
    not only by the client under test. Audit hooks cannot be removed, so one module-level hook is shared
    and only records while some spy is active.
    """

    _installed = False
    _active: list["ConnectionSpy"] = []

    def __init__(self) -> None:
        self.connects: list[Any] = []

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        if event == "socket.connect" and cls._active:
            for spy in cls._active:
                spy.connects.append(args[1] if len(args) > 1 else args)

    def __enter__(self) -> "ConnectionSpy":
        import sys
        if not ConnectionSpy._installed:
            sys.addaudithook(ConnectionSpy._hook)
            ConnectionSpy._installed = True
        ConnectionSpy._active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        ConnectionSpy._active.remove(self)
