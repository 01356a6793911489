"""An OpenAI-compatible HTTP server for edgelm models (the ``[server]`` extra: starlette + uvicorn).

    >>> from edgelm.server import create_app, serve
    >>> serve(edgelm.load("my-model"), port=8000)          # blocks; Ctrl-C stops it cleanly

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``) and ``GET /health``. Errors use the
OpenAI error body ``{"error": {"message", "type", "param", "code"}}``. See docs/server.md.

How a request flows, and why:

* The event loop only parses, validates and writes bytes. Model work runs on a fixed pool of worker
  threads (``workers``) that share one ``Model``: onnxruntime's ``InferenceSession.run`` is thread-safe and
  releases the GIL, so two workers really do decode in parallel.
* In front of the workers sits a bounded queue (``max_queue`` waiting requests). When it is full the
  server answers 503 with ``Retry-After`` at once instead of letting latency grow without bound.
* A worker pushes each decoded text piece to the request's asyncio queue (``call_soon_threadsafe``), so
  streaming costs no polling. Between tokens it checks a cancel flag, which is set when the client
  disconnects or the server shuts down, so nobody pays for tokens that no one will read.
* A streamed request waits for its first event before sending headers: errors the model raises before
  doing work (context overflow, bad settings) still get a proper 400 instead of a broken 200 stream.

Nothing here is imported by ``import edgelm``; starlette and uvicorn are imported when this module is.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgelm.errors import ContextLengthError, EdgeLMError, InvalidArgumentError

log = logging.getLogger("edgelm.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_WORKERS = 2
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more text than any edge model's context holds
API_KEY_ENV = "EDGELM_API_KEY"
# Prompt lookup for greedy requests (temperature 0; edgelm.lookup, docs/lookup.md). Off by default: on the int8
# models it changes greedy output at near-ties (a multi-token call quantizes its activations together), and
# the speed-up depends on the model and the task (benchmarks/results/lookup.md).
DEFAULT_LOOKUP = False

# The model's finish reasons -> OpenAI's. An end-of-sequence token is a natural stop for OpenAI clients.
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_ROLES = {"system", "user", "assistant", "developer", "tool"}


# --- errors in the OpenAI shape ------------------------------------------------------------------
class APIError(Exception):
    """An error answered in the OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _from_model_error(exc: BaseException, kind: str = "chat") -> APIError:
    """Map what a worker raised to the error the client sees (``kind``: "chat" or "completion")."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        total = exc.prompt_tokens + exc.max_new_tokens
        return APIError(
            400,
            f"This model's maximum context length is {exc.context_length} tokens, but the request needs {total} "
            f"tokens ({exc.prompt_tokens} in the prompt + {exc.max_new_tokens} for the completion). "
            f"Shorten the prompt or the messages, or lower max_tokens.",
            param="max_tokens" if exc.prompt_tokens < exc.context_length else (
                "messages" if kind == "chat" else "prompt"),
            code="context_length_exceeded")
    if isinstance(exc, InvalidArgumentError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, EdgeLMError):
        return APIError(500, str(exc), type="server_error", code="model_error")
    return APIError(500, f"Internal error while generating ({type(exc).__name__}). See the server log.",
                    type="server_error", code="internal_error")


# --- request parsing -------------------------------------------------------------------------------
_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _field(body: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``body[name]`` checked to be of JSON type ``kind`` (``float`` accepts integers); absent/null -> default."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise APIError(400, f"'{name}' must be a finite number.", param=name, code="invalid_value")
    if not ok:
        raise APIError(400, f"'{name}' must be {_KIND_NAMES[kind]}, not {_type_name(value)}.", param=name,
                       code="invalid_type")
    return value


def _unsupported(name: str, why: str) -> APIError:
    return APIError(400, f"'{name}' is not supported by this server: {why}", param=name, code="unsupported_parameter")


@dataclass
class _Request:
    """One parsed, validated generation request."""

    kind: str                      # "completion" | "chat"
    model: str | None
    prompt: Any                    # str, list[int] (completion) or list of messages (chat)
    gen_kwargs: dict[str, Any]
    stream: bool
    include_usage: bool
    # chat only: what goes to the chat template besides the messages (tools, documents, chat_template_kwargs)
    chat_kwargs: dict[str, Any] = field(default_factory=dict)

    def template_args(self) -> dict[str, Any]:
        """``chat_kwargs`` as ``apply_chat_template`` takes them (template variables unpacked)."""
        kw = dict(self.chat_kwargs)
        return {**kw.pop("chat_template_kwargs", {}), **kw}


def _parse_sampling(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    max_tokens = _field(body, "max_tokens", int)
    if kind == "chat" and max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is not None:
        if max_tokens < 1:
            raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}.", param="max_tokens",
                           code="invalid_value")
        kw["max_new_tokens"] = max_tokens
    temperature = _field(body, "temperature", float)
    if temperature is not None:
        if temperature < 0:
            raise APIError(400, f"'temperature' must be >= 0 (0 = greedy), got {temperature}.", param="temperature",
                           code="invalid_value")
        kw["temperature"] = float(temperature)
    top_p = _field(body, "top_p", float)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}.", param="top_p", code="invalid_value")
        kw["top_p"] = float(top_p)
    seed = _field(body, "seed", int)
    if seed is not None:
        if seed < 0:
            raise APIError(400, f"'seed' must be >= 0, got {seed}.", param="seed", code="invalid_value")
        kw["seed"] = seed
    # Common extensions (vLLM, llama.cpp and others accept them too).
    top_k = _field(body, "top_k", int)
    if top_k is not None:
        if top_k < 0:
            raise APIError(400, f"'top_k' must be >= 0 (0 = off), got {top_k}.", param="top_k", code="invalid_value")
        kw["top_k"] = top_k
    for name in ("min_p", "repetition_penalty"):
        value = _field(body, name, float)
        if value is not None:
            kw[name] = float(value)
    if _field(body, "ignore_eos", bool):  # fixed-length outputs, for benchmarks
        kw["ignore_eos"] = True

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "'stop' must be a string or an array of strings.", param="stop", code="invalid_type")
        if len(stop) > 16:
            raise APIError(400, f"'stop' may hold at most 16 sequences, got {len(stop)}.", param="stop",
                           code="invalid_value")
        stop = [s for s in stop if s]
        if stop:
            kw["stop"] = stop

    n = _field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 on this server, got {n}. Send the request {n} times (with different "
                       f"seeds) for several completions.", param="n", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, float, 0) != 0:
            raise _unsupported(name, "leave it at 0, or use 'repetition_penalty' (e.g. 1.1) instead.")
    logit_bias = _field(body, "logit_bias", dict)
    if logit_bias:
        raise _unsupported("logit_bias", "remove it from the request.")
    if kind == "chat":
        if _field(body, "logprobs", bool):
            raise _unsupported("logprobs", "remove it or set it to false.")
        if body.get("functions") or body.get("function_call"):
            name = "functions" if body.get("functions") else "function_call"
            raise _unsupported(name, "the legacy function-calling fields are not available; send 'tools' instead.")
        fmt = _field(body, "response_format", dict)
        if fmt and fmt.get("type", "text") != "text":
            raise _unsupported("response_format", "only {\"type\": \"text\"} is available.")
    else:
        if _field(body, "logprobs", int):
            raise _unsupported("logprobs", "remove it or set it to null.")
        if _field(body, "echo", bool):
            raise _unsupported("echo", "remove it or set it to false; the prompt is yours already.")
        best_of = _field(body, "best_of", int, 1)
        if best_of != 1:
            raise _unsupported("best_of", "set it to 1 or remove it.")
        if _field(body, "suffix", str):
            raise _unsupported("suffix", "insertion (fill-in-the-middle) is not available.")
    return kw


def _parse_prompt(body: Mapping[str, Any]) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required: a string or an array of token ids.", param="prompt",
                       code="missing_required_parameter")
    prompt = body["prompt"]
    # OpenAI allows a batch of prompts; a batch of exactly one is unwrapped, larger ones are refused.
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"'prompt' holds {len(prompt)} prompts; this server takes one prompt per request. "
                           f"Send them as separate requests.", param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return list(prompt)
    raise APIError(400, f"'prompt' must be a string or a non-empty array of token ids, not {_type_name(prompt)}.",
                   param="prompt", code="invalid_type")


def _parse_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the runtime's (docs/runtime.md): what chat templates expect.

    Text parts are joined into one string (templates of text models read ``content`` as a string); an assistant
    message may carry ``tool_calls`` instead of content, whose ``function.arguments`` JSON string becomes a dict
    (templates write it with ``tojson``); ``tool`` messages keep ``tool_call_id`` and ``name``.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        what = "missing" if messages is None else f"{_type_name(messages)}"
        raise APIError(400, f"'messages' must be a non-empty array of {{\"role\", \"content\"}} objects (got {what}).",
                       param="messages", code="invalid_type" if messages is not None else "missing_required_parameter")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"'{param}' must be an object, not {_type_name(msg)}.", param=param, code="invalid_type")
        role = msg.get("role")
        if role not in _ROLES:
            raise APIError(400, f"'{param}.role' must be one of {sorted(_ROLES)}, got {role!r}.",
                           param=f"{param}.role", code="invalid_value")
        parsed: dict[str, Any] = {"role": "system" if role == "developer" else role}
        calls = _parse_tool_calls(msg.get("tool_calls"), f"{param}.tool_calls") if role == "assistant" else None
        content = msg.get("content")
        if content is None and role == "assistant":
            content = None if calls else ""
        if isinstance(content, list):  # content parts: only text ones make sense for a text model
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"'{param}.content' may only hold {{\"type\": \"text\", \"text\": ...}} parts; "
                                   f"this model reads text only.", param=f"{param}.content", code="invalid_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is not None:
            if not isinstance(content, str):
                raise APIError(400, f"'{param}.content' must be a string, not {_type_name(content)}.",
                               param=f"{param}.content", code="invalid_type")
            parsed["content"] = content
        if calls:
            parsed["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            value = msg.get(key)
            if value is not None:
                if not isinstance(value, str):
                    raise APIError(400, f"'{param}.{key}' must be a string, not {_type_name(value)}.",
                                   param=f"{param}.{key}", code="invalid_type")
                parsed[key] = value
        out.append(parsed)
    return out


def _parse_tool_calls(calls: Any, param: str) -> list[dict[str, Any]] | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise APIError(400, f"'{param}' must be an array, not {_type_name(calls)}.", param=param, code="invalid_type")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise APIError(400, f"'{param}[{j}]' must be {{\"type\": \"function\", \"id\": ..., \"function\": "
                           f"{{\"name\": ..., \"arguments\": \"{{...}}\"}}}}.", param=f"{param}[{j}]",
                           code="invalid_value")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends a JSON string; templates want the object (kept as text if not one)
            try:
                decoded = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                decoded = None
            args = decoded if isinstance(decoded, dict) else args
        elif not isinstance(args, dict):
            raise APIError(400, f"'{param}[{j}].function.arguments' must be a JSON string, not {_type_name(args)}.",
                           param=f"{param}[{j}].function.arguments", code="invalid_type")
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def _parse_chat_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """``tools`` (OpenAI function schemas, given to the chat template as they are), ``tool_choice``, and the
    extensions vLLM also accepts: ``documents`` and ``chat_template_kwargs``."""
    out: dict[str, Any] = {}
    tools = _field(body, "tools", list)
    for j, tool in enumerate(tools or ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(fn, dict) and tool.get("type", "function") == "function"
                and isinstance(fn.get("name"), str) and fn["name"]):
            raise APIError(400, f"'tools[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           f"\"description\": ..., \"parameters\": {{...}}}}}}.", param=f"tools[{j}]",
                           code="invalid_value")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise _unsupported("tool_choice", "a local model cannot be forced to call a tool; use \"auto\" or \"none\".")
    _field(body, "parallel_tool_calls", bool)  # checked, then left to the model: it decides how many calls to make
    if tools and choice != "none":  # "none": the model is not to call tools, so it is not shown them
        out["tools"] = tools
    documents = _field(body, "documents", list)
    if documents is not None:
        if not all(isinstance(d, dict) for d in documents):
            raise APIError(400, "'documents' must be an array of objects, e.g. {\"title\": ..., \"text\": ...}.",
                           param="documents", code="invalid_type")
        out["documents"] = documents
    template_kwargs = _field(body, "chat_template_kwargs", dict)
    if template_kwargs:
        from edgelm.tokenizer import validate_template_kwargs

        try:
            out["chat_template_kwargs"] = validate_template_kwargs(template_kwargs)
        except InvalidArgumentError as exc:
            raise APIError(400, exc.message, param="chat_template_kwargs", code="invalid_value") from None
    return out


def _parse_request(body: Any, kind: str) -> _Request:
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_json")
    model = _field(body, "model", str)
    prompt = _parse_messages(body) if kind == "chat" else _parse_prompt(body)
    kw = _parse_sampling(body, kind)
    chat_kwargs = _parse_chat_options(body) if kind == "chat" else {}
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = _field(options, "include_usage", bool, False) if stream else False
    return _Request(kind=kind, model=model, prompt=prompt, gen_kwargs=kw, stream=stream, include_usage=include_usage,
                    chat_kwargs=chat_kwargs)


# --- the worker pool ---------------------------------------------------------------------------------
@dataclass
class _Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] | None = None  # from a Hybrid's cloud answer (a local model's are text)


def _outcome(gen: Any) -> _Outcome:
    return _Outcome(text=gen.text, finish_reason=_FINISH.get(gen.finish_reason, gen.finish_reason),
                    prompt_tokens=int(gen.prompt_tokens), completion_tokens=int(gen.completion_tokens))


class _Job:
    """One request's work, run by a worker thread; events flow back to the event loop through ``events``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[["_Job"], None]):
        self.loop = loop
        self.work = work
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.cancel_reason = "client disconnected"

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening any more
            self.cancelled.set()

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()


class _Engine:
    """``workers`` threads pulling jobs from a queue of at most ``max_queue`` waiting jobs."""

    def __init__(self, workers: int, max_queue: int):
        self.workers = workers
        self.max_queue = max_queue
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: set[_Job] = set()
        self._avg_job_s = 0.5      # running mean of job time, for Retry-After
        self.completed = 0
        self.cancelled = 0         # generations stopped early (client gone, shutdown)

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._stopping.clear()
            for i in range(self.workers):
                t = threading.Thread(target=self._loop, name=f"edgelm-worker-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def stats(self) -> dict[str, int]:
        return {"waiting": self._queue.qsize(), "running": len(self._active), "workers": self.workers,
                "max_queue": self.max_queue, "completed": self.completed, "cancelled": self.cancelled}

    def submit(self, job: _Job) -> None:
        if self._stopping.is_set():
            raise APIError(503, "The server is shutting down; try another server or retry later.",
                           type="server_error", code="shutting_down", headers={"Retry-After": "5"})
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            wait = max(1, math.ceil(self._avg_job_s * (self.max_queue + self.workers) / self.workers))
            raise APIError(503, f"The server is busy: {self.max_queue} requests are already waiting. Retry after "
                           f"{wait} s, or start the server with a larger --max-queue or more --workers.",
                           type="server_error", code="server_busy", headers={"Retry-After": str(wait)}) from None

    def cancel_all(self, reason: str) -> None:
        """Stop every running and waiting job between tokens (used when a shutdown grace period runs out)."""
        with self._lock:
            jobs = list(self._active)
        for job in jobs + list(self._queue.queue):
            job.cancel(reason)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.cancel_all("server shutting down")
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.cancelled.is_set():  # the client left while waiting: skip the work entirely
                job.emit("cancelled", job.cancel_reason)
                with self._lock:
                    self.cancelled += 1
                continue
            with self._lock:
                self._active.add(job)
            t0 = time.perf_counter()
            finished = True
            try:
                finished = job.work(job) is not False
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting request
                if not isinstance(exc, (EdgeLMError, APIError)):
                    log.exception("generation failed")
                job.emit("error", exc)
            finally:
                with self._lock:
                    self._active.discard(job)
                    self.completed += 1
                    self.cancelled += not finished
                    self._avg_job_s = 0.9 * self._avg_job_s + 0.1 * (time.perf_counter() - t0)
        # Jobs still queued at shutdown get an answer instead of hanging.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.emit("error", APIError(503, "The server is shutting down; retry later.", type="server_error",
                                       code="shutting_down", headers={"Retry-After": "5"}))


def _generation_work(model: Any, req: _Request, lookup: bool = False) -> Callable[[_Job], bool]:
    """The worker side of one request: run the model's stream, stopping between tokens once cancelled.

    Non-streamed requests run through the stream too (without sending pieces), so a client that hangs up
    stops its generation either way. The runtime's stream exposes the final Generation (``.generation``)
    once exhausted, which gives exact usage and finish_reason.
    """
    def work(job: _Job) -> bool:
        pieces: list[str] = []
        kwargs = _fit_default_max_tokens(model, req)
        if lookup:  # the model ignores it for sampled requests
            kwargs["lookup"] = True
        # Arguments are validated here, before any decoding; errors go back to the request as an "error".
        it: Iterator[str] = (model.chat_stream(req.prompt, **req.chat_kwargs, **kwargs) if req.kind == "chat"
                             else model.stream(req.prompt, **kwargs))
        result: Any = None
        try:
            while True:
                if job.cancelled.is_set():
                    job.emit("cancelled", job.cancel_reason)
                    return False
                try:
                    piece = next(it)
                except StopIteration as stop:
                    result = stop.value
                    break
                pieces.append(piece)
                if req.stream:
                    job.emit("piece", piece)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        result = getattr(it, "generation", None) or result
        text = "".join(pieces)
        if result is not None and hasattr(result, "completion_tokens"):
            outcome = _outcome(result)  # the runtime reported exact counts
        else:
            outcome = _estimate_outcome(model, req, text, kwargs.get("max_new_tokens"))
        # A Hybrid's stream says where its answer came from; a cloud answer may be tool calls.
        calls = getattr(getattr(it, "result", None), "tool_calls", None)
        if calls:
            outcome.tool_calls, outcome.finish_reason = calls, "tool_calls"
        job.emit("done", outcome)
        return True
    return work


def _fit_default_max_tokens(model: Any, req: _Request) -> dict[str, Any]:
    """Without ``max_tokens``, OpenAI servers generate up to the end of the context. Here the model's default
    ``max_new_tokens`` applies, cut down to the room the prompt leaves, so a long chat without ``max_tokens``
    gets an answer instead of a context-length error. An explicit ``max_tokens`` is never changed."""
    kwargs = dict(req.gen_kwargs)
    if "max_new_tokens" in kwargs:
        return kwargs
    try:
        default = int((getattr(model, "generation_config", None) or {}).get("max_new_tokens") or 128)
        ctx = int(model.context_length)
        if isinstance(req.prompt, list) and req.kind == "completion":
            n_prompt = len(req.prompt)
        else:
            text = model.apply_chat_template(req.prompt, **req.template_args()) if req.kind == "chat" else req.prompt
            n_prompt = len(model.tokenizer.encode(text))
    except Exception:  # noqa: BLE001 - leave it to the model, which raises the proper typed error
        return kwargs
    if n_prompt < ctx and n_prompt + default > ctx:
        kwargs["max_new_tokens"] = ctx - n_prompt
    return kwargs


def _estimate_outcome(model: Any, req: _Request, text: str, limit: int | None) -> _Outcome:
    """Usage for a stream whose iterator does not return a Generation: count by re-tokenizing."""
    tok = model.tokenizer
    if req.kind == "chat":
        prompt_tokens = len(tok.encode(model.apply_chat_template(req.prompt, **req.template_args())))
    elif isinstance(req.prompt, list):
        prompt_tokens = len(req.prompt)
    else:
        prompt_tokens = len(tok.encode(req.prompt))
    completion_tokens = len(tok.encode(text, add_bos=False)) if text else 0
    if limit is None:
        limit = int(getattr(model, "generation_config", {}).get("max_new_tokens", 128) or 128)
    finish = "length" if completion_tokens >= limit else "stop"
    return _Outcome(text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


# --- the app --------------------------------------------------------------------------------------------
def _model_id(model: Any) -> str:
    for attr in ("name", "model_id", "id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    for attr in ("path", "folder"):
        value = getattr(model, attr, None)
        value = getattr(value, "path", value)
        if isinstance(value, (str, os.PathLike)):
            return Path(value).name or "edgelm"
    return "edgelm"


def _models_map(model_or_models: Any) -> dict[str, Any]:
    if isinstance(model_or_models, Mapping):
        models = dict(model_or_models)
    elif isinstance(model_or_models, (list, tuple)):
        models = {}
        for m in model_or_models:
            mid = _model_id(m)
            if mid in models:
                raise InvalidArgumentError(f"Two models share the id {mid!r}.",
                                           hint="Pass a dict {id: model} to give them distinct ids.")
            models[mid] = m
    else:
        models = {_model_id(model_or_models): model_or_models}
    if not models:
        raise InvalidArgumentError("create_app() needs at least one model.", hint="Pass edgelm.load(...).")
    for mid in models:
        if not isinstance(mid, str) or not mid:
            raise InvalidArgumentError(f"Model ids must be non-empty strings, got {mid!r}.")
    return models


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _ClientGone(Exception):
    pass


class EdgeLMServer:
    """The state behind one app: models, the worker pool and the optional API key."""

    def __init__(self, model_or_models: Any, *, api_key: str | None, max_queue: int, workers: int,
                 max_body_bytes: int, lookup: bool = DEFAULT_LOOKUP):
        for name, value, low in (("workers", workers, 1), ("max_queue", max_queue, 1),
                                 ("max_body_bytes", max_body_bytes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}.")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise InvalidArgumentError("api_key must be a non-empty string (or None for no key).")
        if not isinstance(lookup, bool):
            raise InvalidArgumentError(f"lookup must be a bool, got {lookup!r}.")
        self.lookup_drafts = lookup
        self.models = _models_map(model_or_models)
        self.default_model = next(iter(self.models))
        self._api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.engine = _Engine(workers, max_queue)
        self.created = int(time.time())

    # -- checks done on the event loop before any work --
    def check_auth(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "Missing API key. Send it as the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        # Constant-time comparison, and the given token is never echoed or logged.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise APIError(401, "Incorrect API key. Send the server's key as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> Any:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        too_big = APIError(413, f"The request body is larger than this server's limit of {limit} bytes. Send a "
                           f"shorter prompt, or start the server with a larger max_body_bytes.",
                           code="request_too_large")
        if length is not None:
            try:
                if int(length) > limit:
                    raise too_big
            except ValueError:
                raise APIError(400, "Invalid Content-Length header.", code="invalid_request") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON ({exc}). Send a JSON object with "
                           f"'Content-Type: application/json'.", code="invalid_json") from None

    def lookup(self, model_id: str | None) -> tuple[str, Any]:
        if model_id is None:
            if len(self.models) == 1:
                return self.default_model, self.models[self.default_model]
            raise APIError(400, f"'model' is required; this server has {sorted(self.models)}.", param="model",
                           code="missing_required_parameter")
        if model_id not in self.models:
            raise APIError(404, f"The model {model_id!r} does not exist on this server. Available: "
                           f"{sorted(self.models)} (GET /v1/models lists them).", param="model",
                           code="model_not_found")
        return model_id, self.models[model_id]

    # -- endpoints --
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(self.models), **self.engine.stats()})

    async def list_models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card(mid) for mid in self.models]})

    async def get_model(self, request: Request) -> Response:
        self.check_auth(request)
        mid, _ = self.lookup(request.path_params["model"])
        return JSONResponse(self._model_card(mid))

    def _model_card(self, mid: str) -> dict[str, Any]:
        card = {"id": mid, "object": "model", "created": self.created, "owned_by": "edgelm"}
        ctx = getattr(self.models[mid], "context_length", None)
        if isinstance(ctx, int):
            card["context_length"] = ctx
        return card

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str) -> Response:
        self.check_auth(request)
        try:
            body = await self.read_json(request)
        except ClientDisconnect:  # gone before the body arrived: nothing to answer, nothing to log as an error
            return Response(status_code=499)
        req = _parse_request(body, kind)
        model_id, model = self.lookup(req.model)
        loop = asyncio.get_running_loop()
        job = _Job(loop, _generation_work(model, req, self.lookup_drafts))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        t0 = time.perf_counter()
        self.engine.submit(job)
        # Until the response starts, watch the connection ourselves; once streaming, starlette does it.
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            first = await _next_event(job, watcher)
        except _ClientGone:
            job.cancel("client disconnected")
            log.info("%s %s: client disconnected before the first token", rid, model_id)
            return Response(status_code=499)
        finally:
            watcher.cancel()
        if first[0] == "error":
            err = _from_model_error(first[1], kind)
            log.info("%s %s: %d %s", rid, model_id, err.status, err.code)
            return err.response()
        if first[0] == "cancelled":
            return APIError(503, f"Generation was stopped: {first[1]}.", type="server_error",
                            code="cancelled", headers={"Retry-After": "5"}).response()
        created = int(time.time())
        if not req.stream:
            out: _Outcome = first[1]
            self._log_done(rid, model_id, out, t0)
            return JSONResponse(self._full_body(kind, rid, created, model_id, out))
        return StreamingResponse(self._events(job, first, req, rid, created, model_id, t0),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _log_done(rid: str, model_id: str, out: _Outcome, t0: float) -> None:
        log.info("%s %s: %d+%d tokens, finish=%s, %.3f s", rid, model_id, out.prompt_tokens,
                 out.completion_tokens, out.finish_reason, time.perf_counter() - t0)

    @staticmethod
    def _usage(out: _Outcome) -> dict[str, int]:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def _full_body(self, kind: str, rid: str, created: int, model_id: str, out: _Outcome) -> dict[str, Any]:
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": out.text}
            if out.tool_calls:
                message.update(content=out.text or None, tool_calls=out.tool_calls)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": out.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                "usage": self._usage(out), "system_fingerprint": None}

    async def _events(self, job: _Job, first: tuple[str, Any], req: _Request, rid: str, created: int,
                      model_id: str, t0: float):
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, *, role: bool = False,
                  tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                if tool_calls:  # each call whole, in one delta (clients join fragments by index)
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice]}
            if req.include_usage:
                body["usage"] = None
            return body

        event = first
        try:
            if chat:
                yield _sse(chunk("", None, role=True))
            while True:
                kind, value = event
                if kind == "piece":
                    if value:
                        yield _sse(chunk(value, None))
                elif kind == "done":
                    if chat and value.tool_calls:
                        yield _sse(chunk(None, None, tool_calls=value.tool_calls))
                    yield _sse(chunk(None if chat else "", value.finish_reason))
                    if req.include_usage:
                        yield _sse({"id": rid, "object": obj, "created": created, "model": model_id, "choices": [],
                                    "usage": self._usage(value)})
                    yield _sse("[DONE]")
                    self._log_done(rid, model_id, value, t0)
                    return
                else:  # an error or a cancel after the stream started: end it properly, with a reason
                    err = (_from_model_error(value, req.kind) if kind == "error" else
                           APIError(503, f"Generation was stopped: {value}.", type="server_error", code="cancelled"))
                    yield _sse(err.body())
                    yield _sse("[DONE]")
                    log.info("%s %s: stream ended early (%s)", rid, model_id, err.code)
                    return
                event = await job.events.get()
        finally:
            # Normal end: harmless. Client gone (this generator was cancelled/closed): the worker stops
            # at the next token instead of decoding for nobody.
            if not job.cancelled.is_set():
                job.cancel("client disconnected")


async def _wait_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has already been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(job: _Job, watcher: asyncio.Future) -> tuple[str, Any]:
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise _ClientGone()


def create_app(model_or_models: Any, *, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               workers: int = DEFAULT_WORKERS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               lookup: bool = DEFAULT_LOOKUP) -> Starlette:
    """Build the ASGI app serving ``model_or_models`` (a Model, a list of Models, or a dict ``{id: Model}``).

    ``api_key``: when set, every ``/v1/*`` request needs ``Authorization: Bearer <api_key>`` (``/health``
    stays open). ``workers`` generation threads share each model; at most ``max_queue`` requests wait for a
    worker before the server answers 503 with ``Retry-After``. Bodies over ``max_body_bytes`` get 413.
    ``lookup``: greedy requests (temperature 0) use prompt lookup (``Model.generate(lookup=True)``).
    The server state is at ``app.state.edgelm`` (an :class:`EdgeLMServer`).
    """
    from contextlib import asynccontextmanager

    state = EdgeLMServer(model_or_models, api_key=api_key, max_queue=max_queue, workers=workers,
                         max_body_bytes=max_body_bytes, lookup=lookup)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state.engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.engine.stop)

    async def api_error(request: Request, exc: Exception) -> Response:
        return exc.response()  # type: ignore[attr-defined]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "") or "error"
        if status == 404:
            detail = f"Unknown URL {request.method} {request.url.path}. This server has /v1/models, " \
                     f"/v1/completions, /v1/chat/completions and /health."
        elif status == 405:
            detail = f"Method {request.method} is not allowed on {request.url.path}."
        return APIError(status, detail, code={404: "not_found", 405: "method_not_allowed"}.get(status),
                        headers=getattr(exc, "headers", None)).response()

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
        return _from_model_error(exc).response()

    routes = [
        Route("/health", state.health, methods=["GET"]),
        Route("/v1/models", state.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", state.get_model, methods=["GET"]),
        Route("/v1/completions", state.completions, methods=["POST"]),
        Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.edgelm = state
    return app


# --- running it -------------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so ``port=0`` works and the printed URL has the real port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}). Pick another --port, or stop the "
                      f"program using it.") from None
    return sock


def _banner(url: str, model_id: str, api_key: bool) -> str:
    auth = ' \\\n  -H "Authorization: Bearer $EDGELM_API_KEY"' if api_key else ""
    return (f"edgelm serve: {model_id} at {url}/v1 (OpenAI-compatible; Ctrl-C to stop)\n"
            f"try:\n  curl {url}/v1/chat/completions \\\n  -H \"Content-Type: application/json\"{auth} \\\n"
            f"  -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
            f"\"max_tokens\": 64}}'")


def serve(model_or_models: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = DEFAULT_WORKERS,
          api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          graceful_timeout: float = 30.0, log_level: str = "info",
          on_ready: Callable[[str], None] | None = None, lookup: bool = DEFAULT_LOOKUP) -> None:
    """Run the server until Ctrl-C or SIGTERM (blocking). ``port=0`` picks a free port.

    On a stop signal the server stops accepting connections and lets in-flight requests finish for up to
    ``graceful_timeout`` seconds; streams still running then are ended with an error event and
    ``data: [DONE]`` (never cut mid-chunk). ``on_ready(url)`` is called once it accepts connections
    (the default prints the URL and an example curl to stdout). ``lookup``: see :func:`create_app`.
    """
    import uvicorn

    app = create_app(model_or_models, api_key=api_key, max_queue=max_queue, workers=workers,
                     max_body_bytes=max_body_bytes, lookup=lookup)
    state: EdgeLMServer = app.state.edgelm
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{bound_port}"

    timers: list[threading.Timer] = []

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if on_ready is not None:
                on_ready(url)
            else:
                print(_banner(url, state.default_model, api_key is not None), flush=True)

        def handle_exit(self, sig, frame):
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                log.info("stopping: finishing in-flight requests (up to %.0f s)", graceful_timeout)
                # Shortly before uvicorn would cancel the tasks, end running generations between tokens so
                # their streams close with an error event + [DONE].
                timer = threading.Timer(max(0.0, graceful_timeout - 1.0), state.engine.cancel_all,
                                        args=("server shutting down",))
                timer.daemon = True
                timer.start()
                timers.append(timer)
            else:  # a second Ctrl-C: stop now
                state.engine.cancel_all("server shutting down")

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                            lifespan="on", access_log=True)
    server = _Server(config)
    # uvicorn re-raises the signal it caught once it has shut down (SIGINT -> KeyboardInterrupt, SIGTERM ->
    # killed). A stop request handled gracefully is a normal exit, so swallow that re-raise here.
    restore = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        for timer in timers:
            timer.cancel()
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        sock.close()


class BackgroundServer:
    """A server running in a daemon thread of this process (for tests, notebooks and embedding).

        >>> with BackgroundServer(edgelm.load("my-model")) as srv:
        ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="-").completions.create(...)

    ``target`` is a Model (or models, as for :func:`create_app`) or an app made by :func:`create_app`;
    other keyword arguments go to :func:`create_app`. ``port=0`` (the default) picks a free port; the real
    one is in ``url`` once the ``with`` block (or :meth:`start`) is entered.
    """

    def __init__(self, target: Any, *, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0, **app_kwargs: Any):
        self.app = target if isinstance(target, Starlette) else create_app(target, **app_kwargs)
        self.host, self.port, self.log_level, self.start_timeout = host, port, log_level, start_timeout
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> EdgeLMServer:
        return self.app.state.edgelm

    def start(self) -> "BackgroundServer":
        import uvicorn

        sock = _bind(self.host, self.port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        # log_config=None: leave the host program's logging alone (uvicorn's records propagate to the root logger).
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, lifespan="on",
                                                     log_config=None))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="edgelm-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start within {self.start_timeout} s; see the log above.")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting connections, let in-flight requests finish, and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
