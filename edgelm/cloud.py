"""CloudClient: a small, careful client for any OpenAI-compatible chat-completions endpoint.

Works with hosted providers, vLLM, llama.cpp's server, Ollama and ``edgelm serve``. Needs the ``[cloud]``
extra (httpx); httpx is imported when the first request is made, so constructing a client (or importing this
module) opens no connection and costs nothing.

Design points, each with a test in tests/test_cloud.py:

* **The API key never leaves the Authorization header.** It is checked when the client is made (surrounding
  whitespace stripped; control and non-ASCII characters refused, without echoing it). It is not in ``repr``,
  log records (httpx's and httpcore's included) or exception messages, args and chains: every error is raised
  afresh, without ``__cause__``/``__context__`` or the failing frames (an httpx exception's request holds the
  headers), and any text a server sends back is scrubbed of every rendering of the key (raw, escaped,
  URL-encoded) before it goes into a message.
* **Every failure is typed.** Whatever httpx, the socket or a hostile body raises becomes a
  :class:`~edgelm.errors.CloudError` subclass, so :class:`edgelm.Hybrid` can fall back with a reason.
* **One deadline per call.** ``timeout`` bounds the whole call - every attempt, every backoff sleep and every
  read and write on the socket (each gets only the time left) - so a server that hangs, trickles bytes or
  floods cannot hold the caller longer than that. ``connect_timeout`` bounds each TCP/TLS connect, and the host
  name's DNS lookup before it (which the socket's own timeout does not cover: a stuck resolver times out too).
* **Answers are capped.** A server that ignores ``max_tokens`` is cut off: by tokens (the server's count, else
  a conservative one: text events, and text bytes / :data:`TEXT_BYTES_PER_TOKEN`), which ends the answer with
  ``finish_reason="length"``, and by bytes read (``max_answer_bytes``), which raises. Reading stops and the
  connection is closed at the cap, so memory stays bounded.
* **Retries only where they can help**: connection errors, timeouts of one attempt, HTTP 429 and 5xx; with
  exponential backoff and jitter, honouring ``Retry-After`` (seconds or an HTTP date). Other 4xx answers mean
  the request itself is wrong, so they fail at once. A stream is retried only before its first piece.
* **TLS verification stays on**; ``verify`` may name a CA bundle for a private certificate authority.
* **Tools pass through.** ``tools`` (and ``documents``) go into the request as given; messages are sent in the
  OpenAI wire shape (:func:`openai_messages`), and a reply's ``tool_calls`` come back on :class:`CloudReply`,
  streamed ones reassembled from their fragments.
"""
from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit, urlunsplit

from edgelm.errors import (CloudError, CloudHTTPError, CloudResponseError, CloudTimeoutError, EdgeLMError,
                           InvalidArgumentError)

log = logging.getLogger("edgelm.cloud")

API_KEY_ENV = ("EDGELM_CLOUD_API_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_MAX_BODY_IN_MESSAGE = 200

# Answer caps, for servers that ignore max_tokens (a flood of tiny events must not grow memory or time).
# The byte cap counts the decoded body as read from the wire; ``CloudClient(max_answer_bytes=N)`` replaces it.
ANSWER_BYTES_BASE = 64 << 10        # bytes any answer may use, plus ...
ANSWER_BYTES_PER_TOKEN = 4 << 10    # ... this per max_tokens (one token's SSE event is ~200-400 bytes)
ANSWER_BYTES_UNCAPPED = 16 << 20    # the byte cap of a call that sets no max_tokens
# Text past max_tokens x this many bytes is over the token cap even when the server sends few, large events
# (a token's text averages ~4 bytes; 32 leaves room for long whitespace and CJK tokens).
TEXT_BYTES_PER_TOKEN = 32


@dataclass
class CloudReply:
    """One finished answer from the cloud endpoint."""

    text: str
    finish_reason: str | None  # as the server said it ("stop", "length", ...), None if it did not say
    model: str | None          # the model name the server reports
    prompt_tokens: int | None  # from the server's usage block, None when it sends none
    completion_tokens: int | None
    attempts: int              # HTTP attempts made (1 = no retry)
    total_time_s: float
    # The function calls the model asked for, as the server sent them (OpenAI shape: id, type, function.name,
    # function.arguments as a JSON string); None when it asked for none. ``text`` is then often "".
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


# The message keys of OpenAI's chat API. Anything else a message carries (the runtime's ``thinking`` copy, app
# bookkeeping) stays on the device: strict endpoints refuse unknown keys.
_WIRE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as an OpenAI chat request carries them (checked like :meth:`edgelm.Model.chat`'s messages).

    The runtime's messages are what chat templates want; the wire differs in two places: a tool call's
    ``function.arguments`` is a JSON string there (templates take a dict), and a tool result's content is text
    (a dict is sent as JSON). An assistant message with tool calls and no content gets ``"content": null``.
    Already-OpenAI messages pass through unchanged.
    """
    from edgelm.tokenizer import validate_messages

    out = []
    for m in validate_messages(messages):
        wire = {k: m[k] for k in _WIRE_KEYS if k in m}
        content = wire.get("content")
        if isinstance(content, dict):
            wire["content"] = json.dumps(content, ensure_ascii=False)
        elif content is None:
            wire["content"] = None if "tool_calls" in wire else ""
        if "tool_calls" in wire:
            wire["tool_calls"] = [_wire_call(c) for c in wire["tool_calls"]]
        out.append(wire)
    return out


def _wire_call(call: dict[str, Any]) -> dict[str, Any]:
    call = dict(call)
    fn = call.get("function")
    if isinstance(fn, dict):
        call.setdefault("type", "function")
        if "arguments" in fn and not isinstance(fn["arguments"], str):
            call["function"] = {**fn, "arguments": json.dumps(fn["arguments"], ensure_ascii=False)}
    return call


def _redact_url(url: str) -> str:
    """Drop user:password@ and the query string from a URL before it goes into a message or a log."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# Header names whose values are secrets as much as the API key (Azure's "api-key", cookies, tokens ...).
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "cookie", "session", "password")


class _Secrets:
    """A client's secrets - the API key, the extra headers (secret-looking values among them), the URL's
    password and query values - and every rendering of them that could show up in text: raw, repr- and
    bytes-escaped, JSON-escaped, URL-encoded. Its repr shows none of them, so neither does a traceback frame's
    ``self`` or a debugger."""

    def __init__(self, key: str | None, others: Sequence[str] = (), headers: dict[str, str] | None = None):
        self.key = key
        self.headers = dict(headers or {})  # the extra request headers: some hold secrets too
        forms: set[str] = set()
        for value in ([key] if key else []) + [v for v in others if len(v) >= 6]:  # shorter: not worth mangling text
            forms.update({value, repr(value)[1:-1], json.dumps(value)[1:-1], quote(value, safe=""),
                          quote_plus(value, safe=""), repr(value.encode("utf-8", "backslashreplace"))[2:-1]})
        forms.discard("")
        # Longest first: a rendering that contains another (the url-encoded key holds parts of the raw one)
        # goes whole.
        self._forms = sorted(forms, key=len, reverse=True)
        self.longest = len(self._forms[0]) if self._forms else 0
        if self._forms:
            with _LIVE_LOCK:
                _LIVE_SECRETS.add(self)
            _scrub_http_logs()

    def scrub(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, "***")
        return text

    def __repr__(self) -> str:
        return "<secrets>"


_LIVE_SECRETS: "weakref.WeakSet[_Secrets]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()  # a WeakSet cannot be listed while another thread adds to it
# httpcore logs response headers at DEBUG (a hostile server can put the key there); httpx logs URLs at INFO.
_SCRUBBED_LOGGERS = ("edgelm.cloud", "httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
                     "httpcore.proxy", "httpcore.socks")


class _LogScrubber(logging.Filter):
    """Removes live clients' secrets from the records of the loggers above, before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        with _LIVE_LOCK:
            secrets = list(_LIVE_SECRETS)
        if not secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:  # a record whose args do not fit its format: leave it to logging's own error path
            return True
        clean = text
        for s in secrets:
            clean = s.scrub(clean)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            for s in secrets:
                exc_text = s.scrub(exc_text)
            record.exc_text = exc_text  # formatters use the cached text
        return True


_LOG_SCRUBBER = _LogScrubber()


def _scrub_http_logs() -> None:
    """Put the scrubber on the HTTP stack's loggers (idempotent; a logger's filter sees only its own records,
    so each is named)."""
    for name in _SCRUBBED_LOGGERS:
        logger = logging.getLogger(name)
        if _LOG_SCRUBBER not in logger.filters:
            logger.addFilter(_LOG_SCRUBBER)


def _checked_key(key: Any, source: str) -> tuple[str | None, InvalidArgumentError | None]:
    """``key`` stripped of surrounding whitespace (a secret file's trailing newline), or the error to raise.

    The error is returned, not raised, so the caller can drop its own reference to the key first: a raised
    error's traceback keeps the frames' locals. It names where the key came from, never the key."""
    if key is None:
        return None, None
    if not isinstance(key, str):
        return None, InvalidArgumentError(f"api_key must be a string or None, got {type(key).__name__}.")
    key = key.strip()
    if not key:
        return None, InvalidArgumentError(f"The API key ({source}) is empty.",
                                          hint="Pass the key, or api_key=None for a server that needs none.")
    bad = next((i for i, ch in enumerate(key) if not " " <= ch <= "~"), None)
    if bad is not None:
        return None, InvalidArgumentError(
            f"The API key ({source}) has a control or non-ASCII character (position {bad + 1}); "
            "an HTTP header cannot carry it.", hint="Copy the key again from the provider; keys are plain ASCII.")
    return key, None


def _checked_headers(headers: Any) -> tuple[dict[str, str], list[str], InvalidArgumentError | None]:
    """Extra headers, checked so that h11 can send them; the values that look secret (for scrubbing); or the
    error to raise (returned, like :func:`_checked_key`'s, and naming the header, never its value)."""
    if headers is None:
        return {}, [], None
    if not isinstance(headers, dict):
        return {}, [], InvalidArgumentError(f"headers must be a dict of strings, got {type(headers).__name__}.")
    out, secret = {}, []
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not all(33 <= ord(c) <= 126 and c not in '()<>@,;:\\"/[]?={}'
                                                             for c in name):
            return {}, [], InvalidArgumentError(f"Header name {name!r} is not a valid HTTP header name.")
        if not isinstance(value, str) or not all(" " <= c <= "~" or c == "\t" for c in value):
            return {}, [], InvalidArgumentError(f"The value of header {name!r} is not a string of printable ASCII "
                                                "(control and non-ASCII characters cannot be sent).")
        out[name] = value
        if any(word in name.lower() for word in _SECRET_HEADER_WORDS):
            secret.append(value.strip())
    return out, secret, None


def _url_secrets(url: str) -> list[str]:
    """The parts of a URL that _redact_url drops: the password and query values."""
    parts = urlsplit(url)
    return [v for v in [parts.password or "", *(v for _, v in parse_qsl(parts.query))] if v]


class _Retryable(Exception):
    """Internal: one attempt failed in a way that another attempt may fix."""

    def __init__(self, error: CloudError, retry_after: float | None = None):
        self.error = error
        self.retry_after = retry_after


class CloudStream:
    """Iterator over the text pieces of a streamed answer. After it is exhausted, ``reply`` holds the
    finished :class:`CloudReply` (text, finish_reason, usage if the server sent it)."""

    def __init__(self, gen: Iterator[str], failure: Any = None):
        self._gen = gen
        self._failure = failure  # maps an unexpected exception to a CloudError (CloudClient._failure)
        self.reply: CloudReply | None = None

    def __iter__(self) -> "CloudStream":
        return self

    def __next__(self) -> str:
        err = None
        try:
            return next(self._gen)
        except StopIteration:
            raise
        except EdgeLMError as exc:
            err = exc
        except Exception as exc:
            err = self._failure(exc)[0] if self._failure is not None else CloudResponseError(
                f"The cloud stream failed ({type(exc).__name__}).")
        raise _detached(err)  # outside the except block, so the error has no __context__

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]


class CloudClient:
    """Client for an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``https://api.example.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name to request; None leaves it out, which single-model servers (``edgelm serve``,
            llama.cpp) answer with their one model. Hosted APIs need it.
        api_key: sent as ``Authorization: Bearer ...``. None reads ``EDGELM_CLOUD_API_KEY``, then
            ``OPENAI_API_KEY``; no key at all sends no Authorization header (fine for local servers).
        timeout: seconds for the whole call, retries and backoff included.
        connect_timeout: seconds for each connection attempt, and for looking up the host name before it.
        max_retries: extra attempts after the first on connection errors, timeouts, 429 and 5xx.
        backoff: first backoff delay in seconds; doubles per retry, with jitter, up to ``backoff_max``.
        max_retry_after: the longest ``Retry-After`` honoured; a server asking for more is treated as
            "rate-limited past retries" and the call fails at once (so a fallback can answer instead).
        verify: True (system CAs) or the path of a CA bundle. TLS verification cannot be switched off.
        headers: extra request headers (printable ASCII). Values of headers whose names look secret
            (``api-key``, ``x-auth-token``, cookies ...) are kept out of messages and logs like the key.
        max_answer_bytes: the most bytes one answer may bring (decoded body); past it reading stops and the call
            raises :class:`~edgelm.errors.CloudResponseError`. None: ``ANSWER_BYTES_BASE +
            ANSWER_BYTES_PER_TOKEN * max_tokens`` (64 KiB + 4 KiB per token), or ``ANSWER_BYTES_UNCAPPED``
            (16 MiB) for a call without ``max_tokens``.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, connect_timeout: float = 5.0, max_retries: int = 2,
                 backoff: float = 0.5, backoff_max: float = 8.0, max_retry_after: float = 30.0,
                 verify: bool | str = True, headers: dict[str, str] | None = None,
                 max_answer_bytes: int | None = None):
        if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https") \
                or not urlsplit(base_url).hostname:
            raise InvalidArgumentError(f"base_url must be an http(s) URL, got {_safe_repr(base_url)}.",
                                       hint="Pass the API root, e.g. http://127.0.0.1:8000/v1.")
        for name, value, low in (("timeout", timeout, 0.0), ("connect_timeout", connect_timeout, 0.0),
                                 ("backoff", backoff, -1e-9), ("backoff_max", backoff_max, -1e-9),
                                 ("max_retry_after", max_retry_after, -1e-9)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > low:
                raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}.")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise InvalidArgumentError(f"max_retries must be an integer >= 0, got {max_retries!r}.")
        if verify is False or not isinstance(verify, (bool, str)):
            raise InvalidArgumentError(
                "TLS verification cannot be switched off.",
                hint="For a private certificate authority pass verify='/path/to/ca-bundle.pem'.")
        if max_answer_bytes is not None and (not isinstance(max_answer_bytes, int) or isinstance(max_answer_bytes, bool)
                                             or max_answer_bytes < 1):
            raise InvalidArgumentError(
                f"max_answer_bytes must be a positive integer or None, got {max_answer_bytes!r}.")
        extra_headers, secret_values, problem = _checked_headers(headers)
        source = "api_key"
        if api_key is None:
            source = next((k for k in API_KEY_ENV if os.environ.get(k, "").strip()), "")
            api_key = os.environ[source] if source else None
        key, key_problem = _checked_key(api_key, source)
        problem = problem or key_problem
        if problem is not None:  # the error keeps this frame's locals: no secret left in them
            api_key = headers = extra_headers = secret_values = key = None
            raise problem
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.max_retry_after = float(max_retry_after)
        self.verify = verify
        self.max_answer_bytes = max_answer_bytes
        # The key lives only in here (repr "<secrets>"): not in repr(self), vars(self) or any log.
        self._secrets = _Secrets(key, secret_values + _url_secrets(base_url), extra_headers)
        self._client = None      # httpx.Client, created on first use
        self._client_lock = threading.Lock()
        self._rng = random.Random()

    # --- public -----------------------------------------------------------------------------------
    @property
    def has_api_key(self) -> bool:
        return getattr(self, "_secrets", None) is not None and self._secrets.key is not None

    def __repr__(self) -> str:  # getattr: also for a client whose __init__ refused its arguments (tracebacks)
        return (f"CloudClient(base_url={_redact_url(getattr(self, 'base_url', ''))!r}, "
                f"model={getattr(self, 'model', None)!r}, api_key={'<set>' if self.has_api_key else None}, "
                f"timeout={getattr(self, 'timeout', None)})")

    def chat(self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, stop: str | Sequence[str] | None = None,
             seed: int | None = None, timeout: float | None = None, tools: Sequence[dict[str, Any]] | None = None,
             documents: Sequence[dict[str, Any]] | None = None) -> CloudReply:
        """Send a chat and return the finished answer. Raises a :class:`~edgelm.errors.CloudError`
        subclass once retries are used up or the deadline has passed.

        ``messages`` may hold tool calls and tool results (see :func:`openai_messages`); ``tools`` (OpenAI
        function schemas) are sent as given, and the reply's ``tool_calls`` hold any calls the model made.
        ``documents`` is not an OpenAI field: it is sent only when given, for servers that read it (vLLM,
        ``edgelm serve``); others answer 400.
        """
        body = self._body(messages, max_tokens, temperature, top_p, stop, seed, stream=False, tools=tools,
                          documents=documents)
        return self._call("/chat/completions", body, timeout)

    def complete(self, prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, stop: str | Sequence[str] | None = None, seed: int | None = None,
                 timeout: float | None = None) -> CloudReply:
        """Plain text continuation through the legacy ``/completions`` endpoint (vLLM, llama.cpp,
        ``edgelm serve``; many hosted chat models no longer offer it). Same retries and errors as chat."""
        body = self._completion_body(prompt, max_tokens, temperature, top_p, stop, seed, stream=False)
        return self._call("/completions", body, timeout)

    def _completion_body(self, prompt: str, *args: Any, stream: bool) -> dict[str, Any]:
        """A /completions request: the chat body's settings, with ``prompt`` instead of ``messages``."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgumentError("prompt must be a non-empty string.")
        body = self._body([{"role": "user", "content": prompt}], *args, stream=stream)
        del body["messages"]
        body["prompt"] = prompt
        return body

    def _retrying(self, attempt_once: Any, deadline: float) -> tuple[Any, int]:
        """Run ``attempt_once`` until it succeeds, backing off between retryable failures (the policy lives in
        :meth:`_wait_or_raise`). Returns its result and the number of attempts."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return attempt_once(), attempt
            except _Retryable as r:
                self._wait_or_raise(r, attempt, deadline)

    def _call(self, path: str, body: dict[str, Any], timeout: float | None) -> CloudReply:
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        started = time.monotonic()
        err: BaseException | None = None
        try:  # (one call, so the server's data is in no local of this frame, which the error keeps)
            return self._parse_reply(*self._retrying(lambda: self._attempt_json(path, body, deadline), deadline),
                                     time.monotonic() - started, text_field=path == "/completions",
                                     max_tokens=body.get("max_tokens"))
        except EdgeLMError as exc:
            err = exc
        except Exception as exc:  # whatever else broke while talking to the endpoint: typed, so Hybrid falls back
            err = self._failure(exc)[0]
        raise _detached(err)  # outside the except block, so the error has no __context__

    def stream(self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               stop: str | Sequence[str] | None = None, seed: int | None = None,
               timeout: float | None = None, tools: Sequence[dict[str, Any]] | None = None,
               documents: Sequence[dict[str, Any]] | None = None) -> CloudStream:
        """Stream a chat answer as text pieces (server-sent events). Retries happen only before the first
        piece; a stream that breaks later raises :class:`~edgelm.errors.CloudResponseError` (or
        :class:`~edgelm.errors.CloudTimeoutError`) from the iterator, after the pieces already given.
        Tool calls arrive in fragments; ``reply.tool_calls`` holds them reassembled."""
        body = self._body(messages, max_tokens, temperature, top_p, stop, seed, stream=True, tools=tools,
                          documents=documents)
        return self._start_stream("/chat/completions", body, timeout)

    def stream_complete(self, prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, stop: str | Sequence[str] | None = None,
                        seed: int | None = None, timeout: float | None = None) -> CloudStream:
        """Stream a plain text continuation from ``/completions`` (see :meth:`complete`)."""
        body = self._completion_body(prompt, max_tokens, temperature, top_p, stop, seed, stream=True)
        return self._start_stream("/completions", body, timeout)

    def _start_stream(self, path: str, body: dict[str, Any], timeout: float | None) -> CloudStream:
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        holder: list[CloudStream] = []
        stream = CloudStream(self._stream_gen(path, body, deadline, holder), self._failure)
        holder.append(stream)
        return stream

    def close(self) -> None:
        """Close pooled connections. The client may still be used afterwards (it reconnects)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- request plumbing -------------------------------------------------------------------------
    def _body(self, messages, max_tokens, temperature, top_p, stop, seed, *, stream: bool, tools: Any = None,
              documents: Any = None) -> dict[str, Any]:
        from edgelm.tokenizer import validate_tools

        wire = openai_messages(messages)
        tools = validate_tools(tools)
        if documents is not None and (not isinstance(documents, (list, tuple))
                                      or not all(isinstance(d, dict) for d in documents)):
            raise InvalidArgumentError(f"documents must be a list of dicts, got {documents!r}.",
                                       hint='Pass e.g. [{"title": "...", "text": "..."}].')
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidArgumentError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
        body: dict[str, Any] = {"messages": wire, "stream": stream}
        if tools:  # as given; an empty list is left out (OpenAI refuses "tools": [])
            body["tools"] = tools
        if documents is not None:
            body["documents"] = list(documents)
        if self.model:  # no model name: the server's default (single-model servers such as `edgelm serve`)
            body = {"model": self.model, **body}
        for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                           ("seed", seed)):
            if value is not None:
                body[key] = value
        if stop is not None:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return body

    def _http(self):
        with self._client_lock:  # one pooled client even when the first calls come from several threads
            return self._http_locked()

    def _http_locked(self):
        if self._client is not None:
            return self._client
        try:
            import httpx
        except ModuleNotFoundError:
            httpx = None
        if httpx is None:
            from edgelm.cli import install_hint

            raise CloudError("The cloud client needs httpx, which is not installed.", hint=install_hint("cloud"))
        # identity: no compressed bodies to inflate (a server that compresses anyway is decoded by _Decoder,
        # which bounds what one chunk may inflate to).
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", **self._secrets.headers}
        if self._secrets.key:
            headers["Authorization"] = f"Bearer {self._secrets.key}"
        problem = None
        try:
            client = httpx.Client(verify=self.verify, headers=headers, follow_redirects=False)
        except Exception as exc:  # e.g. verify names a CA bundle that does not exist
            problem = CloudError(f"Could not set up the HTTP client for {self._where()} ({type(exc).__name__}: "
                                 f"{self._excerpt(_text_of(exc))}).",
                                 hint="Check verify= (the CA bundle path) and headers=.")
        headers = None  # noqa: F841 - the error below keeps this frame: no Authorization value in it
        if problem is not None:
            raise problem
        if not _bound_by_deadline(client):
            log.debug("httpx pools not found: reads are bounded per read and checked against the deadline per chunk")
        self._client = client
        return client

    def _timeouts(self, deadline: float) -> dict[str, float]:
        """httpcore's per-request timeouts, each carrying the call's deadline (see :class:`_Until`)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CloudTimeoutError(f"No answer from {self._where()} within {self.timeout:g} s.",
                                    hint="Raise the client's timeout or check the server.")
        return {"connect": _Until(min(self.connect_timeout, remaining), deadline),
                "read": _Until(remaining, deadline), "write": _Until(remaining, deadline),
                "pool": _Until(remaining, deadline)}

    def _byte_cap(self, max_tokens: Any) -> int:
        if self.max_answer_bytes is not None:
            return self.max_answer_bytes
        if isinstance(max_tokens, int) and max_tokens > 0:
            return ANSWER_BYTES_BASE + ANSWER_BYTES_PER_TOKEN * max_tokens
        return ANSWER_BYTES_UNCAPPED

    def _where(self) -> str:
        return _redact_url(self.base_url)

    def _scrub(self, text: str) -> str:
        """Remove every rendering of the key (and other secrets) from text before it goes into a message."""
        return self._secrets.scrub(text)

    def _excerpt(self, text: str | bytes, n: int = _MAX_BODY_IN_MESSAGE) -> str:
        """The first ``n`` characters of ``text``, scrubbed *before* cutting (a cut key would slip through),
        whitespace runs folded."""
        head = text[:n + 4 * self._secrets.longest + 16]
        if isinstance(head, bytes):
            head = head.decode("utf-8", "replace")
        return " ".join(self._scrub(head).split())[:n]

    def _failure(self, exc: BaseException) -> tuple[CloudError, bool]:
        """Anything raised while talking to the endpoint, as a typed error; and whether another attempt may help.

        The original exception is not kept (nor chained): an httpx exception's ``request`` holds the
        Authorization header. Only its type name and scrubbed text go into the message."""
        if isinstance(exc, CloudError):
            return exc, False
        import httpx
        name, detail = type(exc).__name__, self._excerpt(_text_of(exc)) or "no detail"
        where = self._where()
        if isinstance(exc, httpx.TimeoutException):
            if detail.startswith(_LOOKUP_TOO_SLOW):  # ours (_resolve): it names the host and the time it had
                return CloudTimeoutError(f"{where} could not be reached in time ({name}: {detail}).",
                                         hint="Check the host name and the DNS resolver, or raise the client's "
                                              "connect_timeout and timeout."), True
            return CloudTimeoutError(f"{where} did not answer in time ({name}).",
                                     hint="Check that the server is up, or raise the client's timeout."), True
        if isinstance(exc, (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL)):
            return CloudError(f"The request to {where} could not be sent ({name}: {detail}).",
                              hint="Check base_url and any extra headers."), False
        if isinstance(exc, (httpx.TransportError, OSError)):
            return CloudError(f"Could not reach {where} ({name}: {detail}).",
                              hint="Check the URL and that the server is running and reachable."), True
        if isinstance(exc, (httpx.HTTPError, httpx.StreamError, zlib.error, ValueError, RecursionError)):
            return CloudResponseError(f"{where} sent an answer that cannot be read ({name}: {detail}).",
                                      hint="Check that base_url points at an OpenAI-compatible API."), False
        return CloudError(f"Unexpected {name} while talking to {where}: {detail}.",
                          hint="The cloud call failed; the request may be retried."), False

    def _open(self, path: str, body: dict[str, Any], deadline: float):
        """Start one attempt; return an open httpx response with a 2xx status (the caller closes it)."""
        err = retry = None
        try:
            client = self._http()
            request = client.build_request("POST", self.base_url + path, json=body)
            request.extensions["timeout"] = self._timeouts(deadline)
            response = client.send(request, stream=True)
        except Exception as exc:
            err, retry = self._failure(exc)
        request = None  # noqa: F841 - its headers hold the key; the errors below keep this frame
        if err is not None:
            raise _Retryable(err) if retry else err
        if response.status_code < 300:
            return response
        # An error status: read a little of the body for the message, then decide whether to retry.
        try:
            detail = self._read_capped(response, deadline, cap=4096, truncate=True)
        except CloudError:
            detail = b""
        finally:
            response.close()
        status = response.status_code
        detail = self._excerpt(detail)
        message = f"{self._where()} answered HTTP {status}" + (f": {detail}" if detail else ".")
        if status == 429:
            err = CloudHTTPError(message, status_code=status,
                                 hint="The endpoint is rate-limiting; slow down or raise the plan's limits.")
        elif status in (401, 403):
            err = CloudHTTPError(message, status_code=status,
                                 hint="Check the API key (EDGELM_CLOUD_API_KEY or api_key=...).")
        elif status == 404:
            err = CloudHTTPError(message, status_code=status,
                                 hint="Check base_url (it usually ends in /v1) and the model name.")
        else:
            err = CloudHTTPError(message, status_code=status,
                                 hint="The server reported an error; retry later or check its logs.")
        if status in _RETRY_STATUS:
            raise _Retryable(err, _parse_retry_after(response.headers.get("retry-after")))
        raise err

    def _chunks(self, response, deadline: float, cap: int, *, truncate: bool = False) -> Iterator[bytes]:
        """The body, decoded, in chunks: at most ``cap`` bytes in all (past it: CloudResponseError, or a quiet
        end with ``truncate``), and the deadline checked after every chunk received. httpx and socket errors
        pass through (the caller maps them)."""
        decoder = _Decoder(response.headers.get("content-encoding", ""))
        size = 0
        bad = None
        try:
            for raw in response.iter_raw():
                for chunk in decoder.feed(raw):
                    size += len(chunk)
                    if size > cap:
                        if truncate:
                            yield chunk[:len(chunk) - (size - cap)]
                            return
                        raise CloudResponseError(
                            f"{self._where()} sent more than {cap} bytes for one answer; stopped reading.",
                            hint="The server ignored max_tokens or floods; raise max_answer_bytes if it is "
                                 "legitimate.")
                    yield chunk
                if time.monotonic() > deadline:
                    raise CloudTimeoutError(f"{self._where()} did not finish its answer within {self.timeout:g} s.",
                                            hint="Raise the client's timeout or check the server.")
            if decoder.unsupported:
                raise CloudResponseError(f"{self._where()} sent a body with Content-Encoding "
                                         f"{self._excerpt(decoder.unsupported, 40)!r}, which edgelm does not decode.",
                                         hint="Configure the server (or proxy) to send uncompressed answers.")
        except zlib.error:
            bad = CloudResponseError(f"{self._where()} sent a body that is not valid {decoder.name} "
                                     "(its Content-Encoding).",
                                     hint="Check the server or any proxy in between.")
        if bad is not None:
            raise bad

    def _read_capped(self, response, deadline: float, cap: int, *, truncate: bool = False) -> bytes:
        """A whole (capped) body. Errors come back typed, timeouts as CloudTimeoutError."""
        chunks: list[bytes] = []
        err = None
        try:
            for chunk in self._chunks(response, deadline, cap, truncate=truncate):
                chunks.append(chunk)
        except Exception as exc:
            err, retry = self._failure(exc)
            if retry and not isinstance(err, CloudTimeoutError):
                err = CloudError(f"The connection to {self._where()} broke while reading ({type(exc).__name__}).",
                                 hint="Check the server; the request may be retried.")
        if err is not None:
            raise err
        return b"".join(chunks)

    def _attempt_json(self, path: str, body: dict[str, Any], deadline: float) -> Any:
        response = self._open(path, body, deadline)
        try:
            raw = self._read_capped(response, deadline, self._byte_cap(body.get("max_tokens")))
        except (CloudResponseError, CloudHTTPError):
            raise  # what the server sent is wrong: another attempt would get the same
        except CloudError as exc:  # a timeout, or the connection reset mid-body: worth another attempt
            raise _Retryable(exc) from None
        finally:
            response.close()
        data = err = None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, an int over 4300 digits, nesting too deep
            err = CloudResponseError(
                f"{self._where()} sent a body that is not JSON (starts {self._excerpt(raw, 80)!r}).",
                hint="Check that base_url points at an OpenAI-compatible API.")
        if err is not None:
            raise err
        return data

    def _wait_or_raise(self, r: _Retryable, attempt: int, deadline: float) -> None:
        """Sleep before the next attempt, or raise the attempt's error if retrying cannot help in time."""
        err = r.error
        if attempt > self.max_retries:
            err.message += f" (after {attempt} attempts)"
            raise _rebuild(err) from None
        if r.retry_after is not None:
            if r.retry_after > self.max_retry_after:
                err.message += f" (server asked to wait {r.retry_after:.0f} s, more than max_retry_after)"
                raise _rebuild(err) from None
            delay = r.retry_after
        else:
            cap = min(self.backoff_max, self.backoff * (2 ** (attempt - 1)))
            delay = cap * (0.5 + 0.5 * self._rng.random())  # "equal jitter": spread clients, keep a floor
        if time.monotonic() + delay >= deadline:
            if isinstance(err, CloudTimeoutError):
                raise _rebuild(err) from None
            err.message += f" (no time left to retry within {self.timeout:g} s)"
            raise _rebuild(err) from None
        log.info("cloud attempt %d failed (%s); retrying in %.2f s", attempt, type(err).__name__, delay)
        time.sleep(delay)

    # --- responses --------------------------------------------------------------------------------
    def _bad(self, what: str) -> CloudResponseError:
        return CloudResponseError(f"{self._where()} sent a malformed chat completion: {what}.",
                                  hint="Check that base_url points at an OpenAI-compatible chat-completions API.")

    def _parse_reply(self, data: Any, attempts: int, elapsed: float, *, text_field: bool = False,
                     max_tokens: int | None = None) -> CloudReply:
        if not isinstance(data, dict):
            raise self._bad("the body is not a JSON object")
        if "error" in data and "choices" not in data:
            raise self._bad("it carries an error object: " + self._excerpt(str(data["error"])))
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._bad("no 'choices'")
        content = choices[0].get("text")
        if text_field and not isinstance(content, str):  # /completions
            raise self._bad("choices[0].text is not a string")
        tool_calls = None
        if not text_field:
            message = choices[0].get("message")
            if not isinstance(message, dict):
                raise self._bad("choices[0].message is not an object")
            content, tool_calls = message.get("content"), message.get("tool_calls") or None
            if tool_calls is not None and not (isinstance(tool_calls, list)
                                               and all(isinstance(c, dict) for c in tool_calls)):
                raise self._bad("choices[0].message.tool_calls is not a list of objects")
            if content is None and tool_calls:  # a call and nothing said: normal for tool calls
                content = ""
            if not isinstance(content, str):
                raise self._bad("choices[0].message.content is not a string")
        finish_reason = _str_or_none(choices[0].get("finish_reason"))
        limit = max_tokens * TEXT_BYTES_PER_TOKEN if isinstance(max_tokens, int) else None
        if limit is not None and len(content) > limit // 4 and len(content.encode("utf-8", "replace")) > limit:
            # More text than max_tokens can be (see TEXT_BYTES_PER_TOKEN): the server ignored it. Cut, as a
            # model that reached max_tokens would have stopped.
            log.info("cloud answer past max_tokens=%d (%d characters); cut", max_tokens, len(content))
            content = content.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")
            finish_reason = "length"
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return CloudReply(text=content, finish_reason=finish_reason,
                          model=_str_or_none(data.get("model")), prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                          completion_tokens=_int_or_none(usage.get("completion_tokens")), attempts=attempts,
                          total_time_s=elapsed, tool_calls=tool_calls)

    def _stream_gen(self, path: str, body: dict[str, Any], deadline: float,
                    holder: list[CloudStream]) -> Iterator[str]:
        started = time.monotonic()
        # Retries only until the response is open with a 2xx status; a stream that breaks later is not retried.
        response, attempt = self._retrying(lambda: self._open(path, body, deadline), deadline)
        max_tokens = body.get("max_tokens")
        pieces: list[str] = []
        calls: dict[int, dict[str, Any]] = {}  # tool calls by index, assembled from their fragments
        finish_reason = model = None
        usage: dict[str, Any] = {}
        done = False
        outputs = out_bytes = 0  # events that carried text or tool-call fragments, and those bytes (the token cap)
        err = None
        try:
            for line in _lines(self._chunks(response, deadline, self._byte_cap(max_tokens))):
                line = line.strip()
                if not line or line.startswith(":"):  # blank separator or SSE comment (keep-alive)
                    continue
                if not line.startswith("data:"):
                    continue  # "event:", "id:", "retry:" fields carry nothing we need
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(payload)
                except (ValueError, RecursionError):
                    event = _NOT_JSON
                if event is _NOT_JSON:
                    raise self._bad(f"a stream event is not JSON ({self._excerpt(payload, 60)!r})")
                if not isinstance(event, dict):
                    raise self._bad("a stream event is not a JSON object")
                if "error" in event:
                    raise self._bad("the stream carries an error: " + self._excerpt(str(event["error"])))
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                model = event.get("model", model)
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise self._bad("a stream event has no 'choices' list")
                if not choices:
                    continue  # the usage-only event some servers send last
                choice = choices[0] if isinstance(choices[0], dict) else {}
                fragments = None
                if path == "/completions":
                    piece = choice.get("text")
                else:
                    delta = choice.get("delta")
                    if not isinstance(delta, dict):
                        raise self._bad("a stream event has no 'delta'")
                    piece, fragments = delta.get("content"), delta.get("tool_calls")
                if piece is not None and not isinstance(piece, str):
                    raise self._bad("a stream event's text is not a string")
                if piece or fragments:
                    # A text event is at least one token. Tool-call fragments count by their bytes only:
                    # servers split arguments into pieces smaller than a token.
                    outputs += bool(piece)
                    out_bytes += len(piece.encode("utf-8", "replace")) if piece else 0
                    out_bytes += _fragment_bytes(fragments)
                    if max_tokens is not None and _past_cap(max_tokens, outputs, out_bytes, usage):
                        # The server ignores max_tokens: end the answer where a model would have (this piece is
                        # dropped) and stop reading; the finally below closes the connection.
                        log.info("cloud stream past max_tokens=%d after %d pieces; stopped reading",
                                 max_tokens, len(pieces))
                        finish_reason, done = "length", True
                        break
                if fragments is not None:
                    self._add_call_fragments(calls, fragments)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if piece:
                    pieces.append(piece)
                    yield piece
        except Exception as exc:
            err = self._stream_failure(exc, len(pieces))
        finally:
            response.close()
        if err is not None:
            raise err
        if not done and finish_reason is None:
            cut = CloudResponseError(
                f"The stream from {self._where()} ended after {len(pieces)} pieces without finishing "
                "(no finish_reason and no [DONE]).", hint="The answer is incomplete; retry the request.")
            cut.stream_cut = True  # the connection ended early: nothing in it was malformed
            raise cut
        holder[0].reply = CloudReply(
            text="".join(pieces), finish_reason=_str_or_none(finish_reason), model=_str_or_none(model),
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")), attempts=attempt,
            total_time_s=time.monotonic() - started, tool_calls=_joined_calls(calls))

    def _stream_failure(self, exc: BaseException, n: int) -> CloudError:
        """An exception from an open stream, typed: it is not retried (pieces may have been given out)."""
        if isinstance(exc, CloudError):
            return exc
        err, retry = self._failure(exc)
        if isinstance(err, CloudTimeoutError):
            return CloudTimeoutError(f"The stream from {self._where()} stalled past the {self.timeout:g} s deadline.",
                                     hint="Raise the client's timeout or check the server.")
        if retry:  # the connection broke
            cut = CloudResponseError(
                f"The stream from {self._where()} broke after {n} pieces ({type(exc).__name__}).",
                hint="Retry the request; if it keeps happening, check the server or any proxy in between.")
            cut.stream_cut = True
            return cut
        return err if isinstance(err, CloudResponseError) else CloudResponseError(err.message, hint=err.hint)

    def _add_call_fragments(self, calls: dict[int, dict[str, Any]], fragments: Any) -> None:
        """Merge one stream event's ``delta.tool_calls``: the first fragment of a call (by ``index``) brings its
        id, type and name, later ones more of its ``arguments`` string (kept as lists of parts until the end, so
        a flood of tiny fragments costs linear time)."""
        if not isinstance(fragments, list):
            raise self._bad("a stream event's delta.tool_calls is not a list")
        for frag in fragments:
            fn = frag.get("function") if isinstance(frag, dict) else None
            if not isinstance(frag, dict) or not isinstance(fn or {}, dict):
                raise self._bad("a stream event's tool call fragment is not an object")
            index = frag.get("index", len(calls))
            if not isinstance(index, int) or isinstance(index, bool):
                raise self._bad("a stream event's tool call has no integer index")
            call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": [], "arguments": []}})
            for key in ("id", "type"):
                if isinstance(frag.get(key), str):
                    call[key] = frag[key]
            for key in ("name", "arguments"):
                if isinstance((fn or {}).get(key), str):
                    call["function"][key].append(fn[key])


_NOT_JSON = object()


def _joined_calls(calls: dict[int, dict[str, Any]]) -> list[dict[str, Any]] | None:
    out = []
    for i in sorted(calls):
        call = calls[i]
        out.append({**call, "function": {k: "".join(v) for k, v in call["function"].items()}})
    return out or None


def _fragment_bytes(fragments: Any) -> int:
    """The text bytes (id, name, arguments) that tool-call fragments bring."""
    if not isinstance(fragments, list):
        return 0
    n = 0
    for frag in fragments:
        fn = frag.get("function") if isinstance(frag, dict) else None
        for v in ([frag.get("id")] if isinstance(frag, dict) else []) + \
                ([fn.get("name"), fn.get("arguments")] if isinstance(fn, dict) else []):
            if isinstance(v, str):
                n += len(v.encode("utf-8", "replace"))
    return n


def _past_cap(max_tokens: int, outputs: int, out_bytes: int, usage: dict[str, Any]) -> bool:
    """Whether a stream has gone past ``max_tokens``. Without the server's own count, a conservative one: each
    text event is at least one token, and so is every TEXT_BYTES_PER_TOKEN bytes of text and tool-call
    fragments (so an honest server is not cut short, and one that ignores max_tokens is cut near it)."""
    reported = _int_or_none(usage.get("completion_tokens")) or 0
    return max(outputs, -(-out_bytes // TEXT_BYTES_PER_TOKEN), reported) > max_tokens


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Text lines of a streamed body. Only each new chunk is searched for line ends, so a long line arriving
    in many chunks costs linear time (its length is bounded by the byte cap)."""
    partial: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            partial.append(chunk[start:end])
            yield b"".join(partial).decode("utf-8", "replace").rstrip("\r")
            partial, start = [], end + 1
        if start < len(chunk):
            partial.append(chunk[start:])
    if partial:
        yield b"".join(partial).decode("utf-8", "replace")


class _Until(float):
    """A timeout that carries the call's deadline down to the socket. httpx applies one timeout to each read,
    so a server that trickles a byte just inside it could hold a call for ever; httpcore hands this value to
    the network stream unchanged, and :class:`_DeadlineStream` gives each read, write and connect only the
    time left. Its float value (the time left when the request was built) is what a plain backend would use."""

    def __new__(cls, seconds: float, deadline: float) -> "_Until":
        self = super().__new__(cls, seconds)
        self.deadline = deadline
        return self


def _left(timeout: Any, kind: str) -> Any:
    if not isinstance(timeout, _Until):
        return timeout
    left = timeout.deadline - time.monotonic()
    if left <= 0:
        import httpcore
        raise getattr(httpcore, kind)("the call's deadline has passed")
    return min(float(timeout), left)


class _DeadlineStream:
    """An httpcore network stream whose reads, writes and TLS handshake end at the call's deadline."""

    def __init__(self, stream: Any):
        self._stream = stream

    def read(self, max_bytes: int, timeout: Any = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, "ReadTimeout"))

    def write(self, buffer: bytes, timeout: Any = None) -> None:
        self._stream.write(buffer, _left(timeout, "WriteTimeout"))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: Any = None) -> "_DeadlineStream":
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _left(timeout, "ConnectTimeout")))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Lookup:
    """One host name's DNS lookup, run in a daemon thread so a caller can stop waiting for it. getaddrinfo cannot
    be interrupted: a lookup the caller gave up on finishes on its own (the resolver's own timeouts), and calls
    that need the same name meanwhile wait on it instead of starting another, so a dead resolver costs one
    thread per name, not one per call."""

    _running: dict[tuple[str, int], "_Lookup"] = {}
    _lock = threading.Lock()

    def __init__(self, host: str, port: int):
        self.done = threading.Event()
        self.addresses: list[str] = []
        self.error: OSError | None = None
        threading.Thread(target=self._run, args=(host, port), name="edgelm-dns", daemon=True).start()

    @classmethod
    def of(cls, host: str, port: int) -> "_Lookup":
        with cls._lock:
            lookup = cls._running.get((host, port))
            if lookup is None:
                lookup = cls._running[host, port] = cls(host, port)
            return lookup

    def _run(self, host: str, port: int) -> None:
        try:  # as socket.create_connection asks (any family, stream sockets), addresses in the resolver's order
            found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            self.addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        except OSError as exc:  # (socket.gaierror) nothing of the request in it: the name and the resolver's words
            self.error = exc
        finally:
            with self._lock:
                if self._running.get((host, port)) is self:
                    del self._running[host, port]
            self.done.set()


_LOOKUP_TOO_SLOW = "looking up the host name"


def _resolve(host: str, port: int, timeout: float | None) -> list[str]:
    """``host``'s addresses within ``timeout`` seconds. The socket's connect timeout does not cover DNS
    (httpcore's sync backend calls socket.create_connection, whose getaddrinfo runs unbounded first), so a slow
    or dead resolver could hold a call far past its deadline. Past ``timeout``: httpcore.ConnectTimeout naming
    the host and the time (httpx makes it a ConnectTimeout, :meth:`CloudClient._failure` a CloudTimeoutError)."""
    import httpcore

    try:
        ipaddress.ip_address(host)
        return [host]  # an address already: nothing to look up
    except ValueError:
        pass
    lookup = _Lookup.of(host, port)
    if not lookup.done.wait(timeout):
        raise httpcore.ConnectTimeout(f"{_LOOKUP_TOO_SLOW} {host} took longer than {timeout:.3g} s")
    if lookup.error is not None or not lookup.addresses:
        raise httpcore.ConnectError(f"could not look up the host name {host} ({lookup.error or 'no address'})")
    return lookup.addresses


class _DeadlineBackend:
    """An httpcore network backend whose streams are :class:`_DeadlineStream`s, and whose connects look the host
    name up within the connect timeout and the call's deadline (:func:`_resolve`)."""

    def __init__(self, backend: Any):
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: Any = None, local_address: str | None = None,
                    socket_options: Any = None) -> _DeadlineStream:
        import httpcore

        addresses = _resolve(host, port, _left(timeout, "ConnectTimeout"))
        # Each address in turn, as socket.create_connection does with a name; every attempt gets only the time
        # left. TLS still checks the certificate against the URL's host name (httpcore takes it from the URL).
        failure: Exception | None = None
        for address in addresses:
            try:
                return _DeadlineStream(self._backend.connect_tcp(address, port, _left(timeout, "ConnectTimeout"),
                                                                 local_address, socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure  # (addresses is never empty)

    def connect_unix_socket(self, path: str, timeout: Any = None, socket_options: Any = None) -> _DeadlineStream:
        return _DeadlineStream(self._backend.connect_unix_socket(path, _left(timeout, "ConnectTimeout"),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _bound_by_deadline(client: Any) -> bool:
    """Put :class:`_DeadlineBackend` under the connection pools of an ``httpx.Client`` (its own and any proxy
    mounts). httpx does not take a network backend, so this reaches its pools' ``_network_backend``; when a
    future httpx hides them, False (reads are then bounded one by one, and the deadline checked per chunk; DNS
    is then bounded by nothing but the resolver).

    Why not a public extension point: httpcore's pools take ``network_backend=`` publicly, but httpx 0.28's
    ``HTTPTransport`` (public) builds its pool itself and does not pass one through, and a transport of our own
    around an httpcore pool would have to redo what ``HTTPTransport`` does privately (mapping httpcore's
    exceptions to httpx's, wrapping the response stream) and the proxy mounts httpx makes from the environment.
    A few private attribute reads that fail closed are the smaller dependency on internals."""
    found = False
    for transport in [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None and callable(getattr(backend, "connect_tcp", None)):
            if not isinstance(backend, _DeadlineBackend):
                pool._network_backend = _DeadlineBackend(backend)
            found = True
    return found


class _Decoder:
    """Content-Encoding decoding whose output per step is bounded, so a compressed bomb inflates 64 KiB at a time
    and meets the byte cap instead of memory. The client asks for identity; gzip and deflate are decoded for
    servers that compress anyway (httpx's own decoder would inflate a whole chunk at once)."""

    def __init__(self, encoding: str):
        names = [e.strip().lower() for e in encoding.split(",")]
        names = [e for e in names if e not in ("", "identity")]
        self.name = names[0] if len(names) == 1 else "identity"
        self.unsupported = encoding if len(names) > 1 or self.name not in ("identity", "gzip", "x-gzip",
                                                                            "deflate") else ""
        # 32 + MAX_WBITS: a zlib or gzip header, whichever comes.
        self._z = zlib.decompressobj(32 + zlib.MAX_WBITS) if self.name != "identity" and not self.unsupported \
            else None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.unsupported:
            return
        if self._z is None:
            if data:
                yield data
            return
        while data and not self._z.eof:
            out = self._z.decompress(data, 1 << 16)
            data = self._z.unconsumed_tail
            if out:
                yield out


def _detached(err: BaseException) -> BaseException:
    """``err`` with no chain and no traceback yet, to be raised outside any except block: an httpx exception
    (or its frames' locals) holds the request and its Authorization header, and ``raise ... from None`` only
    hides ``__context__``."""
    err.__cause__ = None
    err.__context__ = None
    err.__suppress_context__ = True
    return err.with_traceback(None)


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return ""


def _rebuild(err: CloudError) -> CloudError:
    """Re-create an error so its str() reflects a message amended after construction."""
    if isinstance(err, CloudHTTPError):
        return type(err)(err.message, status_code=err.status_code, hint=err.hint)
    return type(err)(err.message, hint=err.hint)


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _safe_repr(v: Any) -> str:
    return repr(_redact_url(v)) if isinstance(v, str) else type(v).__name__


__all__ = ["CloudClient", "CloudReply", "CloudStream", "API_KEY_ENV"]
