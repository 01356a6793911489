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
* Everything a client controls is bounded before it costs a worker anything (docs/server.md, "Limits"): the
  body's size, nesting and text (no lone surrogates); the prompt's length in characters against what the
  context can hold (so an oversized prompt is refused without being tokenized); how long a connection may take
  to send its request head and body, sit idle, or leave a response unread; how many connections are open.
* A local server is reachable from every web page the user opens, through the browser. So ``Host`` must be a
  local name, an IP address or one the user allowed (DNS rebinding needs a name), a request with an ``Origin``
  must come from an origin the user listed (CORS answers only those), and bodies must be JSON (the body types a
  page may send cross-site without asking first are refused with 415).

Nothing here is imported by ``import edgelm``; starlette and uvicorn are imported when this module is.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
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
from edgelm.tokenizer import validate_stop

log = logging.getLogger("edgelm.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_WORKERS = 2
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more text than any edge model's context holds
# A prompt longer than context_length * this many characters cannot fit, so it is refused before tokenizing.
# English averages about 4 characters per token; 16 leaves room for code and whitespace runs. The bound used is
# never above the model's longest vocabulary entry, which no token can exceed (so tiny vocabularies get a
# tighter bound that is still exact).
DEFAULT_CHARS_PER_TOKEN = 16
MAX_JSON_DEPTH = 64       # nesting of arrays/objects in a body; tool schemas use a handful of levels
# Connections (seconds, and a count). A request head must arrive within HEADER_TIMEOUT of connecting (or of the
# previous response), its body within BODY_TIMEOUT; an idle keep-alive connection closes after KEEP_ALIVE; a
# response the client has stopped reading for SEND_TIMEOUT is dropped; connections beyond MAX_CONNECTIONS get 503.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0       # 1 MiB in 30 s is 35 kB/s
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # uvicorn's own default
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 128
# Host names always accepted (besides IP addresses and the address the server is bound to): DNS rebinding
# cannot point them at another machine.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
API_KEY_ENV = "EDGELM_API_KEY"
# Prompt lookup for greedy requests (temperature 0; edgelm.lookup, docs/lookup.md). "auto": on for the models where
# it returns exactly plain greedy's tokens (Model.lookup_exact: fp32 and int4-fp32 graphs), which the
# measurements let it be (never below 0.96x plain on any task, up to 4.9x on extraction:
# benchmarks/results/lookup-measured-cost.md); off on int8 graphs, where a multi-token call rounds its activations
# together and greedy answers could change at near-ties. True / False force it on / off for every model.
DEFAULT_LOOKUP: bool | str = "auto"
LOOKUP_CHOICES = (True, False, "auto")


def _uses_lookup(model: Any, lookup: bool | str) -> bool:
    """Whether greedy requests to ``model`` use prompt lookup under the server's ``lookup`` setting."""
    return lookup is True or (lookup == "auto" and getattr(model, "lookup_exact", False) is True)

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


# The runtime's argument errors start with the option's name ("temperature must be ...", "prompt token id ...");
# the request field that carries it, for the error's "param".
_RUNTIME_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "min_p": "min_p", "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop",
                   "prompt": "prompt"}


def _param_of(message: str, kind: str) -> str | None:
    word = message.split(" ", 1)[0].strip(".,:'\"")
    param = _RUNTIME_PARAMS.get(word)
    return "messages" if param == "prompt" and kind == "chat" else param


def _from_model_error(exc: BaseException, kind: str = "chat") -> APIError:
    """Map what a worker raised to the error the client sees (``kind``: "chat" or "completion")."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        total = exc.prompt_tokens + exc.max_new_tokens
        if not getattr(exc, "max_new_tokens_given", True):  # no max_tokens sent: the prompt alone fills it
            return APIError(
                400, f"This model's maximum context length is {exc.context_length} tokens, and the prompt alone has "
                     f"{exc.prompt_tokens}: no room for a completion. Shorten the prompt or the messages.",
                param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        return APIError(
            400,
            f"This model's maximum context length is {exc.context_length} tokens, but the request needs {total} "
            f"tokens ({exc.prompt_tokens} in the prompt + {exc.max_new_tokens} for the completion). "
            f"Shorten the prompt or the messages, or lower max_tokens.",
            param="max_tokens" if exc.prompt_tokens < exc.context_length else (
                "messages" if kind == "chat" else "prompt"),
            code="context_length_exceeded")
    if isinstance(exc, InvalidArgumentError):
        return APIError(400, str(exc), param=_param_of(str(exc), kind), code="invalid_value")
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


def _field(body: Mapping[str, Any], name: str, kind: type, default: Any = None, *, path: str = "") -> Any:
    """``body[name]`` checked to be of JSON type ``kind`` (``float`` accepts integers); absent/null -> default.
    ``path`` is where ``body`` sits in the request ("stream_options."), for the error's message and param."""
    value = body.get(name)
    name = path + name
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            finite = ok and math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            finite = False
        if ok and not finite:
            raise APIError(400, f"'{name}' must be a finite number.", param=name, code="invalid_value")
    if not ok:
        raise APIError(400, f"'{name}' must be {_KIND_NAMES[kind]}, not {_type_name(value)}.", param=name,
                       code="invalid_type")
    if kind is int and not -(1 << 63) <= value < (1 << 64):  # JSON allows any size; no setting needs more
        raise APIError(400, f"'{name}' is out of range (it has {len(str(abs(value)))} digits).", param=name,
                       code="invalid_value")
    return value


def _scan_json(value: Any, max_depth: int, where: str = "The request body") -> None:
    """Refuse what parses as JSON but breaks what comes after: nesting deeper than ``max_depth`` (recursive
    code downstream, the chat template's ``tojson`` among it) and strings with a lone surrogate (``"\\ud800"``
    is valid JSON but not text: the tokenizer and every encoder reject it). Iterative, so any depth is safe."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            strings = (item,)
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise APIError(400, f"{where} is nested more than {max_depth} levels deep. Flatten it.",
                               code="invalid_json")
            if isinstance(item, dict):
                strings = tuple(item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                strings = ()
                stack.extend((v, depth + 1) for v in item)
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(400, f"{where} holds a string with a lone surrogate (U+{ord(text[exc.start]):04X} "
                               f"at offset {exc.start}), which is not text. Send valid Unicode: a \\uD800-\\uDBFF "
                               f"escape must be followed by a \\uDC00-\\uDFFF one.", code="invalid_value") from None


def _text_chars(value: Any) -> int:
    """How many characters of text the string values in ``value`` hold (what a chat template renders)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


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
        stop = [s for s in stop if s]
        try:  # the runtime's limits (edgelm.tokenizer.STOP_MAX_COUNT / STOP_MAX_CHARS), checked before queueing
            validate_stop(stop)
        except InvalidArgumentError as exc:
            raise APIError(400, str(exc), param="stop", code="invalid_value") from None
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
            except (ValueError, RecursionError):  # not JSON, a 4,300-digit number, or nested far too deep
                decoded = None
            if isinstance(decoded, dict):
                _scan_json(decoded, MAX_JSON_DEPTH, f"'{param}[{j}].function.arguments'")
                args = decoded
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
    include_usage = _field(options, "include_usage", bool, False, path="stream_options.") if stream else False
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


def _generation_work(model: Any, req: _Request, lookup: bool | str = False) -> Callable[[_Job], bool]:
    """The worker side of one request: run the model's stream, stopping between tokens once cancelled.

    Non-streamed requests run through the stream too (without sending pieces), so a client that hangs up
    stops its generation either way. The runtime's stream exposes the final Generation (``.generation``)
    once exhausted, which gives exact usage and finish_reason.
    """
    # The runtime's Model caps a default max_new_tokens to the room the prompt leaves itself, tokenizing the
    # prompt once; other models (a Hybrid) get the cap worked out here.
    fit = (lambda: dict(req.gen_kwargs)) if _is_runtime_model(model) else (lambda: _fit_default_max_tokens(model, req))
    use_lookup = _uses_lookup(model, lookup)

    def work(job: _Job) -> bool:
        pieces: list[str] = []
        kwargs = fit()
        if use_lookup:  # the model ignores it for sampled requests
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


def _is_runtime_model(model: Any) -> bool:
    from edgelm.model import Model

    return isinstance(model, Model)


def _prompt_char_limit(model: Any, chars_per_token: int) -> int | None:
    """The most characters of prompt text ``model``'s context can hold: ``context_length`` times the smaller of
    ``chars_per_token`` and the longest entry of the vocabulary (no token covers more characters than its
    entry; byte-level entries spell each byte as one character, so they overcount). None (no check) for what
    is not the runtime's Model: a Hybrid may send a long prompt to its cloud."""
    if not _is_runtime_model(model):
        return None
    tok = model.tokenizer
    longest = 1
    for i in range(int(tok.vocab_size)):
        entry = tok.id_to_token(i)
        if entry and len(entry) > longest:
            longest = len(entry)
            if longest >= chars_per_token:
                break
    return int(model.context_length) * min(chars_per_token, longest)


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}.")
    return float(value)


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


def _short(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters: client-controlled text goes into messages and logs only this short."""
    return text if len(text) <= limit else text[:limit] + "..."


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _ClientGone(Exception):
    pass


class EdgeLMServer:
    """The state behind one app: models, the worker pool and the optional API key."""

    def __init__(self, model_or_models: Any, *, api_key: str | None, max_queue: int, workers: int,
                 max_body_bytes: int, lookup: bool | str = DEFAULT_LOOKUP, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
        for name, value, low in (("workers", workers, 1), ("max_queue", max_queue, 1),
                                 ("max_body_bytes", max_body_bytes, 1), ("chars_per_token", chars_per_token, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}.")
        self.body_timeout = _positive_seconds("body_timeout", body_timeout)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise InvalidArgumentError("api_key must be a non-empty string (or None for no key).")
        if not any(lookup is c or (isinstance(c, str) and lookup == c) for c in LOOKUP_CHOICES):
            raise InvalidArgumentError(f"lookup must be True, False or 'auto', got {lookup!r}.")
        self.lookup_drafts = lookup
        self.models = _models_map(model_or_models)
        self.default_model = next(iter(self.models))
        self._api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.engine = _Engine(workers, max_queue)
        self.created = int(time.time())
        self.chars_per_token = chars_per_token
        self._prompt_limits = {mid: _prompt_char_limit(m, chars_per_token) for mid, m in self.models.items()}

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
        """The body as JSON, within the size, time, nesting and text limits (413 / 408 / 415 / 400)."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            # A web page may send text/plain, form and multipart bodies to any address without asking first
            # (no CORS preflight), so accepting them would let any site the user visits drive this server.
            raise APIError(415, f"The request body must be JSON, sent with 'Content-Type: application/json' "
                           f"(got {_short(media) if media else 'no Content-Type'}).", code="unsupported_media_type")
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        too_big = APIError(413, f"The request body is larger than this server's limit of {limit} bytes. Send a "
                           f"shorter prompt, or start the server with a larger max_body_bytes.",
                           code="request_too_large")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise APIError(400, "Invalid Content-Length header.", code="invalid_request",
                               headers={"Connection": "close"}) from None
            if declared > limit:
                raise too_big

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.body_timeout:g} s.",
                           code="request_timeout", headers={"Connection": "close"}) from None
        try:
            body = json.loads(raw)
        except RecursionError:
            body = None
            problem = f"it is nested more than {MAX_JSON_DEPTH} levels deep"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            body = None
            problem = str(exc)
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            body = None
            problem = "a number has too many digits"
        else:
            problem = ""
        del raw
        if problem:
            raise APIError(400, f"The request body is not valid JSON ({_short(problem)}). Send a JSON object with "
                           f"'Content-Type: application/json'.", code="invalid_json")
        _scan_json(body, MAX_JSON_DEPTH)
        return body

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

    def check_prompt_size(self, model_id: str, model: Any, req: _Request) -> None:
        """Refuse, before any tokenizing, a prompt that cannot fit the model's context: more token ids than the
        context, or more characters than ``context_length`` tokens can hold (see :func:`_prompt_char_limit`).
        Tokenizing a megabyte costs a worker about a second and the process 100 MB; counting costs nothing."""
        limit = self._prompt_limits.get(model_id)
        if limit is None:
            return
        ctx = int(model.context_length)
        if isinstance(req.prompt, list) and req.kind == "completion":
            if len(req.prompt) >= ctx:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                               f"{len(req.prompt)} token ids, which leaves no room for the completion. Send fewer "
                               f"tokens.", param="prompt", code="context_length_exceeded")
            return
        chars = _text_chars(req.prompt) + _text_chars(req.chat_kwargs)
        if chars > limit:
            what = "messages" if req.kind == "chat" else "prompt"
            verb = "hold" if req.kind == "chat" else "holds"
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the {what} {verb} {chars} "
                           f"characters, more than {ctx} tokens can hold ({limit} characters, at most "
                           f"{limit // ctx} per token). Shorten the {what}.", param=what,
                           code="context_length_exceeded")

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
        del body  # the parsed request keeps what it needs
        model_id, model = self.lookup(req.model)
        self.check_prompt_size(model_id, model, req)
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
            when = "before the first token" if req.stream else f"after {time.perf_counter() - t0:.1f} s of generating"
            log.info("%s %s: client disconnected %s; generation cancelled", rid, model_id, when)
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
        ended = False  # the stream reached its end (done, or an error told to the client)
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
                    ended = True
                    self._log_done(rid, model_id, value, t0)
                    return
                else:  # an error or a cancel after the stream started: end it properly, with a reason
                    err = (_from_model_error(value, req.kind) if kind == "error" else
                           APIError(503, f"Generation was stopped: {value}.", type="server_error", code="cancelled"))
                    yield _sse(err.body())
                    yield _sse("[DONE]")
                    ended = True
                    log.info("%s %s: stream ended early (%s)", rid, model_id, err.code)
                    return
                event = await job.events.get()
        finally:
            # Normal end: harmless. Client gone (this generator was cancelled/closed): the worker stops
            # at the next token instead of decoding for nobody.
            if not job.cancelled.is_set():
                job.cancel("client disconnected")
                if not ended:
                    log.info("%s %s: client disconnected mid-stream; generation cancelled", rid, model_id)


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


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header or of an address to listen on: no port, no brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin_name(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


class _Guard:
    """ASGI middleware: the cross-site checks in front of every request (403 before any route runs).

    * ``Host`` must be a local name (``localhost``, ``*.localhost``, 127.0.0.1, ::1), an IP address, or a name in
      ``allowed_hosts`` (the name the server was started on is added there). A DNS-rebinding page reaches the
      server under its own name, so this stops it; an IP address cannot be rebound, so it is safe. ``"*"``
      turns the check off. A request without ``Host`` (HTTP/1.0; browsers always send one) passes.
    * A request carrying ``Origin`` (browsers add it to cross-site requests) must come from an origin in
      ``cors_origins`` (``"*"``: any) or from the server's own origin. Only those get CORS headers, preflights
      included; by default none does, so no web page can use the server.
    """

    def __init__(self, app: Any, *, allowed_hosts: Any = (), cors_origins: Any = ()):
        hosts = {_host_name(h) for h in allowed_hosts if h and h.strip()}
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts | set(LOCAL_HOSTS))
        origins = {_origin_name(o) for o in cors_origins if o and o.strip()}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.app = app

    def host_ok(self, host: str | None) -> bool:
        if host is None or self.any_host:
            return True
        name = _host_name(host)
        return bool(name) and (name in self.hosts or name.endswith(".localhost") or _is_ip(name))

    def origin_ok(self, origin: str, host: str | None) -> bool:
        name = _origin_name(origin)
        if self.any_origin or name in self.origins:
            return True
        scheme, _, netloc = name.partition("://")  # same origin: a page this server's own address served
        return host is not None and scheme in ("http", "https") and netloc == host.strip().lower()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers, MutableHeaders

        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.host_ok(host):
            log.warning("refused a request for the host %r (not local, not in --allowed-hosts)", _short(host or ""))
            await APIError(403, f"The host {_short(host or '')!r} is not allowed. Use http://127.0.0.1 or "
                           f"http://localhost, or start the server with --allowed-hosts naming it.",
                           code="host_not_allowed").response()(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if not self.origin_ok(origin, host):
            log.warning("refused a request from the web origin %r (not in --cors-origins)", _short(origin))
            await APIError(403, f"Requests from the web origin {_short(origin)!r} are not allowed. Start the server "
                           f"with --cors-origins naming it to let that site use this server.",
                           code="origin_not_allowed").response()(scope, receive, send)
            return
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "Retry-After"}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:  # a preflight
            cors.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                         "Access-Control-Allow-Headers": headers.get("access-control-request-headers",
                                                                     "Authorization, Content-Type")})
            await Response(status_code=204, headers=cors)(scope, receive, send)
            return

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in cors.items():
                    out[name] = value
            await send(message)

        await self.app(scope, receive, send_with_cors)


def create_app(model_or_models: Any, *, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               workers: int = DEFAULT_WORKERS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               lookup: bool | str = DEFAULT_LOOKUP, allowed_hosts: Any = (), cors_origins: Any = (),
               chars_per_token: int = DEFAULT_CHARS_PER_TOKEN,
               body_timeout: float = DEFAULT_BODY_TIMEOUT) -> Starlette:
    """Build the ASGI app serving ``model_or_models`` (a Model, a list of Models, or a dict ``{id: Model}``).

    ``api_key``: when set, every ``/v1/*`` request needs ``Authorization: Bearer <api_key>`` (``/health``
    stays open). ``workers`` generation threads share each model; at most ``max_queue`` requests wait for a
    worker before the server answers 503 with ``Retry-After``. Bodies over ``max_body_bytes`` get 413, bodies
    slower than ``body_timeout`` seconds 408, and prompts longer than the context times ``chars_per_token``
    characters 400 (before tokenizing). ``allowed_hosts``: host names accepted in ``Host`` besides local
    names and IP addresses (``"*"``: any); ``cors_origins``: web origins that may call the server (none by
    default; ``"*"``: any). ``lookup``: greedy requests (temperature 0) use prompt lookup
    (``Model.generate(lookup=True)``): True, False, or "auto" (the default: for the models whose lookup returns
    exactly plain greedy's tokens, ``Model.lookup_exact``). The server state is at ``app.state.edgelm`` (an :class:`EdgeLMServer`).
    """
    from contextlib import asynccontextmanager

    from starlette.middleware import Middleware

    for name, value in (("allowed_hosts", allowed_hosts), ("cors_origins", cors_origins)):
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise InvalidArgumentError(f"{name} must be a list of strings, got {value!r}.")
    state = EdgeLMServer(model_or_models, api_key=api_key, max_queue=max_queue, workers=workers,
                         max_body_bytes=max_body_bytes, lookup=lookup, chars_per_token=chars_per_token,
                         body_timeout=body_timeout)

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
            detail = f"Unknown URL {request.method} {_short(request.url.path)}. This server has /v1/models, " \
                     f"/v1/completions, /v1/chat/completions and /health."
        elif status == 405:
            detail = f"Method {request.method} is not allowed on {_short(request.url.path)}."
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
    guard = Middleware(_Guard, allowed_hosts=tuple(allowed_hosts), cors_origins=tuple(cors_origins))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[guard],
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.edgelm = state
    return app


# --- running it -------------------------------------------------------------------------------------------
def _bound_names(host: str) -> list[str]:
    """The host names a server listening on ``host`` is reached by: ``host`` itself, and this machine's name
    when it listens on every address (an IP address needs no entry: those are always accepted)."""
    name = _host_name(host)
    if name in ("", "0.0.0.0", "::"):
        return [socket.gethostname()]
    return [] if _is_ip(name) else [name]


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so ``port=0`` works and the printed URL has the real port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, proto, _, addr = infos[0]
    # The protocol number matters: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
    # IPPROTO_TCP, and accepted connections inherit it. With proto 0, every response after the first few on a
    # keep-alive connection waited ~40 ms for the client's delayed ACK (a 32-token request: 52 ms instead of 8).
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}). Pick another --port, or stop the "
                      f"program using it.") from None
    return sock


def _raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, for the connection layer (no request to answer through the app)."""
    body = json.dumps(APIError(status, message, type="server_error" if status >= 500 else "invalid_request_error",
                               code=code).body()).encode()
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{retry}Connection: close\r\n\r\n").encode() + body


def _protocol_class(*, header_timeout: float, body_timeout: float, send_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with the limits it lacks: uvicorn closes idle keep-alive connections, but a
    connection that sends its request head or body slowly (or nothing at all), or stops reading a response,
    would stay open for ever, and it accepts any number of connections.

    * Until a request head is complete (from connecting, or from the previous response): ``header_timeout``.
    * From the head to the end of the body: ``body_timeout`` + 1 s (the app answers 408 at ``body_timeout``
      when it is reading; this closes connections whose body nobody reads).
    * While the client does not read what is sent (writing is paused): ``send_timeout``, then the connection
      is dropped, which cancels its generation.
    * Beyond ``max_connections`` open connections, a new one gets 503 and is closed.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _raw_error(503, "Service Unavailable", f"The server has {max_connections} connections open already. "
                      f"Retry shortly, or start it with a larger --max-connections.", "too_many_connections")
    late_head = _raw_error(408, "Request Timeout", f"The request head did not arrive within {header_timeout:g} s.",
                           "request_timeout")

    class Protocol(H11Protocol):
        _phase: str | None = None
        _timer: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None
        _got_bytes = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refused a connection: %d open (--max-connections)", max_connections)
                transport.write(busy)
                transport.close()
                self._phase = "refused"
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            if self._phase == "refused":
                return
            self._got_bytes = True
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None)
            if self._stall is not None:
                self._stall.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:  # the client is not reading what is sent
            super().pause_writing()
            if self._stall is None:
                self._stall = self.loop.call_later(send_timeout, self._drop)

        def resume_writing(self) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            super().resume_writing()

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse: uvicorn's plain-text 400, as an OpenAI error like every other one."""
            self.transport.write(_raw_error(400, "Bad Request", f"{msg.rstrip('.')}: not valid HTTP/1.1.",
                                            "invalid_request"))
            self.transport.close()

        def _drop(self) -> None:
            log.info("dropped a connection that read nothing for %g s", send_timeout)
            self.transport.abort()  # close() would wait for the unread data to be sent

        def _watch(self) -> None:
            """Arm the timer for what the client owes now: a request head, the rest of a body, or nothing."""
            if self.transport is None or self.transport.is_closing():
                return
            state = self.conn.their_state
            phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            if phase != self._phase:
                if phase == "head":
                    self._got_bytes = False
                self._arm(phase)

        def _arm(self, phase: str | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._phase = phase
            if phase is not None:
                delay = header_timeout if phase == "head" else body_timeout + 1.0
                self._timer = self.loop.call_later(delay, self._expired, phase)

        def _expired(self, phase: str) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            log.info("closed a connection: request %s not received in time", phase)
            if phase == "head" and self._got_bytes:  # a slow client, not an idle one: say why
                self.transport.write(late_head)
            self.transport.close()

    return Protocol


def _uvicorn_config(app: Starlette, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT, send_timeout: float = DEFAULT_SEND_TIMEOUT,
                    max_connections: int = DEFAULT_MAX_CONNECTIONS, **kwargs: Any) -> Any:
    """The uvicorn config both :func:`serve` and :class:`BackgroundServer` run with (limits included)."""
    import uvicorn

    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise InvalidArgumentError(f"max_connections must be an integer >= 1, got {max_connections!r}.")
    protocol = _protocol_class(header_timeout=_positive_seconds("header_timeout", header_timeout),
                               body_timeout=app.state.edgelm.body_timeout,
                               send_timeout=_positive_seconds("send_timeout", send_timeout),
                               max_connections=max_connections)
    return uvicorn.Config(app, http=protocol, lifespan="on",
                          timeout_keep_alive=_positive_seconds("keep_alive_timeout", keep_alive_timeout), **kwargs)


def _banner(url: str, model_id: str, api_key: bool) -> str:
    auth = ' \\\n  -H "Authorization: Bearer $EDGELM_API_KEY"' if api_key else ""
    return (f"edgelm serve: {model_id} at {url}/v1 (OpenAI-compatible; Ctrl-C to stop)\n"
            f"try:\n  curl {url}/v1/chat/completions \\\n  -H \"Content-Type: application/json\"{auth} \\\n"
            f"  -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
            f"\"max_tokens\": 64}}'")


def serve(model_or_models: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = DEFAULT_WORKERS,
          api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          graceful_timeout: float = 30.0, log_level: str = "info",
          on_ready: Callable[[str], None] | None = None, lookup: bool | str = DEFAULT_LOOKUP,
          allowed_hosts: Any = (), cors_origins: Any = (), chars_per_token: int = DEFAULT_CHARS_PER_TOKEN,
          header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT, send_timeout: float = DEFAULT_SEND_TIMEOUT,
          max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """Run the server until Ctrl-C or SIGTERM (blocking). ``port=0`` picks a free port.

    On a stop signal the server stops accepting connections and lets in-flight requests finish for up to
    ``graceful_timeout`` seconds; streams still running then are ended with an error event and
    ``data: [DONE]`` (never cut mid-chunk). ``on_ready(url)`` is called once it accepts connections
    (the default prints the URL and an example curl to stdout). ``host`` is added to ``allowed_hosts``; the
    timeouts and ``max_connections`` are described in :func:`_protocol_class`; the rest: see :func:`create_app`.
    """
    import uvicorn

    app = create_app(model_or_models, api_key=api_key, max_queue=max_queue, workers=workers,
                     max_body_bytes=max_body_bytes, lookup=lookup, allowed_hosts=[*allowed_hosts, *_bound_names(host)],
                     cors_origins=cors_origins, chars_per_token=chars_per_token, body_timeout=body_timeout)
    config = _uvicorn_config(app, header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout,
                             send_timeout=send_timeout, max_connections=max_connections, log_level=log_level,
                             timeout_graceful_shutdown=graceful_timeout, access_log=True)
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
                 start_timeout: float = 30.0, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT, send_timeout: float = DEFAULT_SEND_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, **app_kwargs: Any):
        if not isinstance(target, Starlette):
            app_kwargs["allowed_hosts"] = [*app_kwargs.get("allowed_hosts", ()), *_bound_names(host)]
            target = create_app(target, **app_kwargs)
        self.app = target
        self.host, self.port, self.log_level, self.start_timeout = host, port, log_level, start_timeout
        self.limits = dict(header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout,
                           send_timeout=send_timeout, max_connections=max_connections)
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
        self._server = uvicorn.Server(_uvicorn_config(self.app, log_level=self.log_level, log_config=None,
                                                      **self.limits))
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
