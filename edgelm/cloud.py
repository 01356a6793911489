"""CloudClient: a small, careful client for any OpenAI-compatible chat-completions endpoint.

Works with hosted providers, vLLM, llama.cpp's server, Ollama and ``edgelm serve``. Needs the ``[cloud]``
extra (httpx); httpx is imported when the first request is made, so constructing a client (or importing this
module) opens no connection and costs nothing.

Design points, each with a test in tests/test_cloud.py:

* **The API key never leaves the Authorization header.** It is not in ``repr``, log records or exception
  messages; exceptions are raised ``from None`` so they do not carry httpx request objects (which hold the
  headers), and any text a server sends back is scrubbed of the key before it goes into a message.
* **One deadline per call.** ``timeout`` bounds the whole call - every attempt, every backoff sleep and, for
  streams, every chunk - so a server that hangs or trickles bytes cannot hold the caller longer than that.
  ``connect_timeout`` bounds each TCP/TLS connect.
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
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from edgelm.errors import (CloudError, CloudHTTPError, CloudResponseError, CloudTimeoutError,
                           InvalidArgumentError)

log = logging.getLogger("edgelm.cloud")

API_KEY_ENV = ("EDGELM_CLOUD_API_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_MAX_BODY_IN_MESSAGE = 200


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


class _Retryable(Exception):
    """Internal: one attempt failed in a way that another attempt may fix."""

    def __init__(self, error: CloudError, retry_after: float | None = None):
        self.error = error
        self.retry_after = retry_after


class CloudStream:
    """Iterator over the text pieces of a streamed answer. After it is exhausted, ``reply`` holds the
    finished :class:`CloudReply` (text, finish_reason, usage if the server sent it)."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.reply: CloudReply | None = None

    def __iter__(self) -> "CloudStream":
        return self

    def __next__(self) -> str:
        return next(self._gen)

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
        connect_timeout: seconds for each connection attempt.
        max_retries: extra attempts after the first on connection errors, timeouts, 429 and 5xx.
        backoff: first backoff delay in seconds; doubles per retry, with jitter, up to ``backoff_max``.
        max_retry_after: the longest ``Retry-After`` honoured; a server asking for more is treated as
            "rate-limited past retries" and the call fails at once (so a fallback can answer instead).
        verify: True (system CAs) or the path of a CA bundle. TLS verification cannot be switched off.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, connect_timeout: float = 5.0, max_retries: int = 2,
                 backoff: float = 0.5, backoff_max: float = 8.0, max_retry_after: float = 30.0,
                 verify: bool | str = True, headers: dict[str, str] | None = None):
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
        if api_key is None:
            api_key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise InvalidArgumentError("api_key must be a non-empty string or None.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.max_retry_after = float(max_retry_after)
        self.verify = verify
        self._api_key = api_key  # private on purpose: not in repr, never logged
        self._extra_headers = dict(headers or {})
        self._client = None      # httpx.Client, created on first use
        self._client_lock = threading.Lock()
        self._rng = random.Random()

    # --- public -----------------------------------------------------------------------------------
    @property
    def has_api_key(self) -> bool:
        return self._api_key is not None

    def __repr__(self) -> str:
        return (f"CloudClient(base_url={_redact_url(self.base_url)!r}, model={self.model!r}, "
                f"api_key={'<set>' if self._api_key else None}, timeout={self.timeout})")

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
        data, attempt = self._retrying(lambda: self._attempt_json(path, body, deadline), deadline)
        return self._parse_reply(data, attempt, time.monotonic() - started, text_field=path == "/completions")

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
        stream = CloudStream(self._stream_gen(path, body, deadline, holder))
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
        if self._client is None:
            try:
                import httpx
            except ModuleNotFoundError:
                raise CloudError("The cloud client needs httpx, which is not installed.",
                                 hint='Install it with: pip install "edgelm[cloud]"') from None
            headers = {"Accept": "application/json", **self._extra_headers}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._client = httpx.Client(verify=self.verify, headers=headers, follow_redirects=False)
        return self._client

    def _timeout(self, deadline: float):
        import httpx
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CloudTimeoutError(f"No answer from {self._where()} within {self.timeout:g} s.",
                                    hint="Raise the client's timeout or check the server.")
        return httpx.Timeout(connect=min(self.connect_timeout, remaining), read=remaining, write=remaining,
                             pool=remaining)

    def _where(self) -> str:
        return _redact_url(self.base_url)

    def _scrub(self, text: str) -> str:
        """Remove the API key from any text a server sent back before it goes into a message."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    def _open(self, path: str, body: dict[str, Any], deadline: float):
        """Start one attempt; return an open httpx response with a 2xx status (the caller closes it)."""
        import httpx
        client = self._http()
        url = self.base_url + path
        try:
            request = client.build_request("POST", url, json=body, timeout=self._timeout(deadline))
            response = client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise _Retryable(CloudTimeoutError(
                f"{self._where()} did not answer in time ({type(exc).__name__}).",
                hint="Check that the server is up, or raise the client's timeout.")) from None
        except (httpx.TransportError, OSError) as exc:
            raise _Retryable(CloudError(
                f"Could not reach {self._where()} ({type(exc).__name__}: {self._scrub(str(exc)) or 'no detail'}).",
                hint="Check the URL and that the server is running and reachable.")) from None
        if response.status_code < 300:
            return response
        # An error status: read a little of the body for the message, then decide whether to retry.
        try:
            detail = self._read_capped(response, deadline, cap=4096).decode("utf-8", "replace")
        except CloudError:
            detail = ""
        finally:
            response.close()
        status = response.status_code
        detail = self._scrub(" ".join(detail.split()))[:_MAX_BODY_IN_MESSAGE]
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

    def _read_capped(self, response, deadline: float, cap: int = 16 << 20) -> bytes:
        """Read a response body, enforcing the call's deadline between chunks (so trickling cannot stall)."""
        import httpx
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= cap:
                    break
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("deadline passed while reading the body")
        except httpx.TimeoutException:
            raise CloudTimeoutError(f"{self._where()} did not finish its answer within {self.timeout:g} s.",
                                    hint="Raise the client's timeout or check the server.") from None
        except (httpx.TransportError, OSError) as exc:
            raise CloudError(f"The connection to {self._where()} broke while reading ({type(exc).__name__}).",
                             hint="Check the server; the request may be retried.") from None
        return b"".join(chunks)

    def _attempt_json(self, path: str, body: dict[str, Any], deadline: float) -> Any:
        response = self._open(path, body, deadline)
        try:
            raw = self._read_capped(response, deadline)
        except CloudTimeoutError as exc:
            raise _Retryable(exc) from None
        except CloudError as exc:  # connection reset mid-body: worth another attempt
            raise _Retryable(exc) from None
        finally:
            response.close()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            excerpt = self._scrub(raw[:80].decode("utf-8", "replace"))
            raise CloudResponseError(f"{self._where()} sent a body that is not JSON (starts {excerpt!r}).",
                                     hint="Check that base_url points at an OpenAI-compatible API.") from None

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

    def _parse_reply(self, data: Any, attempts: int, elapsed: float, *, text_field: bool = False) -> CloudReply:
        if not isinstance(data, dict):
            raise self._bad("the body is not a JSON object")
        if "error" in data and "choices" not in data:
            raise self._bad("it carries an error object: " + self._scrub(str(data["error"]))[:_MAX_BODY_IN_MESSAGE])
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
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return CloudReply(text=content, finish_reason=_str_or_none(choices[0].get("finish_reason")),
                          model=_str_or_none(data.get("model")), prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                          completion_tokens=_int_or_none(usage.get("completion_tokens")), attempts=attempts,
                          total_time_s=elapsed, tool_calls=tool_calls)

    def _stream_gen(self, path: str, body: dict[str, Any], deadline: float,
                    holder: list[CloudStream]) -> Iterator[str]:
        import httpx
        started = time.monotonic()
        # Retries only until the response is open with a 2xx status; a stream that breaks later is not retried.
        response, attempt = self._retrying(lambda: self._open(path, body, deadline), deadline)
        pieces: list[str] = []
        calls: dict[int, dict[str, Any]] = {}  # tool calls by index, assembled from their fragments
        finish_reason = model = None
        usage: dict[str, Any] = {}
        done = False
        try:
            for line in _lines(response, deadline):
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
                except json.JSONDecodeError:
                    raise self._bad(f"a stream event is not JSON ({self._scrub(payload[:60])!r})") from None
                if not isinstance(event, dict):
                    raise self._bad("a stream event is not a JSON object")
                if "error" in event:
                    raise self._bad("the stream carries an error: " + self._scrub(str(event["error"]))[:200])
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                model = event.get("model", model)
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise self._bad("a stream event has no 'choices' list")
                if not choices:
                    continue  # the usage-only event some servers send last
                choice = choices[0] if isinstance(choices[0], dict) else {}
                if path == "/completions":
                    piece = choice.get("text")
                else:
                    delta = choice.get("delta")
                    if not isinstance(delta, dict):
                        raise self._bad("a stream event has no 'delta'")
                    piece = delta.get("content")
                    if delta.get("tool_calls") is not None:
                        self._add_call_fragments(calls, delta["tool_calls"])
                if piece is not None and not isinstance(piece, str):
                    raise self._bad("a stream event's text is not a string")
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if piece:
                    pieces.append(piece)
                    yield piece
        except httpx.TimeoutException:
            raise CloudTimeoutError(f"The stream from {self._where()} stalled past the {self.timeout:g} s deadline.",
                                    hint="Raise the client's timeout or check the server.") from None
        except (httpx.TransportError, OSError) as exc:
            raise CloudResponseError(
                f"The stream from {self._where()} broke after {len(pieces)} pieces ({type(exc).__name__}).",
                hint="Retry the request; if it keeps happening, check the server or any proxy in between.") from None
        finally:
            response.close()
        if not done and finish_reason is None:
            raise CloudResponseError(
                f"The stream from {self._where()} ended after {len(pieces)} pieces without finishing "
                "(no finish_reason and no [DONE]).", hint="The answer is incomplete; retry the request.")
        holder[0].reply = CloudReply(
            text="".join(pieces), finish_reason=_str_or_none(finish_reason), model=_str_or_none(model),
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")), attempts=attempt,
            total_time_s=time.monotonic() - started, tool_calls=[calls[i] for i in sorted(calls)] or None)

    def _add_call_fragments(self, calls: dict[int, dict[str, Any]], fragments: Any) -> None:
        """Merge one stream event's ``delta.tool_calls``: the first fragment of a call (by ``index``) brings its
        id, type and name, later ones more of its ``arguments`` string."""
        if not isinstance(fragments, list):
            raise self._bad("a stream event's delta.tool_calls is not a list")
        for frag in fragments:
            fn = frag.get("function") if isinstance(frag, dict) else None
            if not isinstance(frag, dict) or not isinstance(fn or {}, dict):
                raise self._bad("a stream event's tool call fragment is not an object")
            index = frag.get("index", len(calls))
            if not isinstance(index, int) or isinstance(index, bool):
                raise self._bad("a stream event's tool call has no integer index")
            call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            for key in ("id", "type"):
                if isinstance(frag.get(key), str):
                    call[key] = frag[key]
            for key in ("name", "arguments"):
                if isinstance((fn or {}).get(key), str):
                    call["function"][key] += fn[key]


def _lines(response, deadline: float) -> Iterator[str]:
    """Text lines of a streamed body. The deadline is checked after every chunk received (not every line),
    so a server trickling bytes without a newline cannot stall the caller past it."""
    import httpx
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace").rstrip("\r")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("deadline passed during the stream")
    if buffer:
        yield buffer.decode("utf-8", "replace")


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
