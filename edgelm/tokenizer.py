"""Text in, token ids out (and back): the tokenizer wrapper, streaming detokenization, stop strings and chat
templates.

* :class:`Tokenizer` wraps a Hugging Face ``tokenizers`` file and knows the model's BOS/EOS ids. ``encode``
  puts BOS first exactly once, whether or not ``tokenizer.json``'s post-processor already does it.
* :class:`StreamingDetokenizer` turns token ids into text pieces one token at a time. Byte-fallback tokenizers
  emit one UTF-8 byte per token for rare characters, so a piece is held back while it would end inside a
  character; tokenizers that strip a leading space are decoded with a few tokens of context so spaces between
  pieces survive.
* :class:`StopMatcher` cuts the generated text at the first stop string and holds back any tail that could still
  grow into one, so a stop string never leaks into streamed output even when it straddles pieces.
* :class:`ChatTemplate` renders ``messages`` with the model's jinja2 chat template in a sandbox, or with the
  plain fallback documented in docs/runtime.md.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from edgelm.errors import InvalidArgumentError, ModelFormatError, TokenizerError

# Decoders of SentencePiece-style tokenizers strip one leading space from whatever they decode, so a lone token
# decodes without its space. Decoding every step from a few tokens earlier keeps the space (and keeps the
# work per step constant).
_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's special token ids.

    ``encode(text, add_bos=True) -> list[int]`` and ``decode(ids) -> str`` (special tokens skipped).
    """

    def __init__(self, path: str | os.PathLike, *, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos_token: bool | None = None,
                 tokenizer_config: Mapping[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as _HFTokenizer  # imported here: keep edgelm.tokenizer cheap to import

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path} is missing: the model folder has no tokenizer.",
                                 hint="Re-export the model, or copy tokenizer.json from the source model into it.")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON / unknown model types
            raise TokenizerError(f"{path} cannot be read as a Hugging Face tokenizer ({exc}).",
                                 hint="Re-export the model folder or restore tokenizer.json.") from None
        self.path = path
        self.config = dict(tokenizer_config or {})
        self.bos_token_id = bos_token_id if bos_token_id is not None else self._special_id("bos_token")
        eos = list(eos_token_ids) or [i for i in [self._special_id("eos_token")] if i is not None]
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos)
        if add_bos_token is None:
            add_bos_token = bool(self.config.get("add_bos_token", False))
        # Does tokenizer.json's post-processor put BOS first on its own? Probe once with a harmless string.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self._post_adds_bos = self.bos_token_id is not None and bool(probe) and probe[0] == self.bos_token_id
        self.add_bos_token = bool(add_bos_token) or self._post_adds_bos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in self._added_tokens() if t.special)

    def _added_tokens(self) -> list[tuple[int, Any]]:
        try:
            return list(self._tok.get_added_tokens_decoder().items())
        except AttributeError:  # tokenizers older than 0.15
            return []

    def _special_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config files
            token = token.get("content")
        if isinstance(token, str):
            return self._tok.token_to_id(token)
        return None

    # --- encode / decode -------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``. With ``add_bos`` (and a model that uses BOS) the ids start with exactly one BOS."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}.", hint="Pass a str.")
        check_unicode(text, "text")
        want_bos = add_bos and self.add_bos_token and self.bos_token_id is not None
        # Let the post-processor add its special tokens only when it is the thing that adds BOS; a template that
        # adds e.g. EOS at the end would be wrong for a generation prompt.
        ids = self._tok.encode(text, add_special_tokens=want_bos and self._post_adds_bos).ids
        if want_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        elif want_bos and len(ids) > 1 and ids[1] == self.bos_token_id:
            # The text itself began with the BOS string (a chat template that writes "<s>"): do not double it.
            del ids[0]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, ...) are left out unless ``skip_special_tokens=False``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def bos_token(self) -> str:
        return (self.id_to_token(self.bos_token_id) or "") if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return (self.id_to_token(self.eos_token_ids[0]) or "") if self.eos_token_ids else ""

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, " \
               f"eos={list(self.eos_token_ids)})"


def check_unicode(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (U+D800..U+DFFF, e.g. from JSON's ``"\\ud800"`` or a
    bad ``surrogateescape`` decode) has no UTF-8 form, so no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"{what} contains a lone surrogate ({text[exc.start]!r} at index {exc.start}), "
                                   "which is not valid Unicode.",
                                   hint="Send valid UTF-8 text: pair the surrogates or replace them (e.g. "
                                        "text.encode('utf-8', 'replace').decode()).") from None


_WINDOW = 16  # tokens a StreamingDetokenizer decodes at most per step (see _emit)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that never end in the middle of a character.

    ``context`` is the ids that came before (the prompt): they are not emitted, but decoding starts a few
    tokens into them so the first piece keeps its leading space. ``push(id) -> str`` returns the text that
    became final with this token ("" while a multi-byte character is incomplete); ``flush() -> str`` returns
    whatever is left at the end (an incomplete character decodes to U+FFFD there).

    Joined, the pieces equal ``decode(context + ids)`` minus the decoded context, for tokenizers whose decoding
    is prefix-stable (all byte-level BPE and SentencePiece-style tokenizers).
    """

    __slots__ = ("_tok", "_ids", "_prefix", "_read", "_text")

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:]) if context else []
        self._prefix = 0                   # decoding starts here (context for the space-stripping decoders)
        self._read = len(self._ids)        # everything before this has been emitted
        self._text: str | None = None      # decode(ids[prefix:read]), kept so a step decodes once, not twice

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        dec = self._tok._tok.decode
        before = self._text
        if before is None:
            before = self._text = dec(self._ids[self._prefix:self._read], skip_special_tokens=True)
        now = dec(self._ids[self._prefix:], skip_special_tokens=True)
        if not final and (len(now) <= len(before) or now.endswith(_REPLACEMENT)):
            return ""  # nothing new yet, or the last character is still missing bytes
        piece = now[len(before):]
        chunk = self._read  # ids[chunk:] is what this piece was decoded from: whole characters
        self._read, self._text = len(self._ids), now
        # The window ids[prefix:] grows by a token per step; past _WINDOW tokens it restarts at the chunk just
        # emitted (whole characters, and context enough for the space-stripping decoders), so a step decodes
        # only a few tokens, and the text of the new window is decoded once then.
        if self._read - self._prefix > _WINDOW:
            self._prefix = chunk
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
            self._text = None
        return piece


class StopMatcher:
    """Finds stop strings in streamed text and holds back any tail that could still become one.

    ``feed(text) -> (safe_text, stopped)``: ``safe_text`` can be shown now; when ``stopped`` is true the
    text has been cut just before the stop string and nothing more must be shown. Generation stops where a stop
    string is first complete; the text is cut at the earliest start among the stop strings complete there.
    ``flush()`` returns the held-back tail at the end of generation (it never completed a stop string).
    """

    __slots__ = ("stops", "_pending", "_longest")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._pending = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self._pending += text
        pending = self._pending
        # The stop that completes first (smallest end) ends generation; the text is cut at the earliest start
        # among the stops complete by then. This depends only on the text, not on how it was split into pieces.
        end = min((i + len(s) for s in self.stops for i in (pending.find(s),) if i >= 0), default=-1)
        if end >= 0:
            cut = min(i for s in self.stops for i in (pending.find(s, 0, end),) if i >= 0)
            self._pending = ""
            return pending[:cut], True
        # Hold back the longest suffix that is a prefix of some stop string.
        hold = 0
        for n in range(min(len(pending), self._longest - 1), 0, -1):
            tail = pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                hold = n
                break
        if hold:
            self._pending = pending[-hold:]
            return pending[:-hold], False
        self._pending = ""
        return pending, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


# Limits on the stop strings one call may pass. Every generated piece is searched for each stop string, and text
# that could still grow into one is held back from a stream, so both numbers bound per-token work and how much of
# a streamed answer can wait unseen; the server passes a request's `stop` straight here. 16 is what the server
# always allowed (OpenAI allows 4); 256 characters is far above any real stop string (an end-of-turn marker, a
# delimiter line) and keeps the hold-back a few lines long. Measured with StopMatcher (the per-token search) on a
# shared 2-core dev box: 16 strings of 256 characters cost 6-9 us per token, 1,000 strings of 1,000 characters up
# to 0.4 ms, more than the default model's whole decode step (0.3 ms); the cost grows with the count.
STOP_MAX_COUNT = 16
STOP_MAX_CHARS = 256


def validate_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings as a tuple without repeats; ``None`` means none. Raises InvalidArgumentError for anything but
    str/list[str], and past the limits: at most STOP_MAX_COUNT strings of at most STOP_MAX_CHARS characters
    each. The plain fallback chat template's turn marker (FALLBACK_STOP, which chat adds on top of the caller's
    stops) is not counted."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise InvalidArgumentError(f"stop must be a str or a list of str, got {type(stop).__name__}.",
                                   hint='Pass e.g. stop="\\n" or stop=["\\n\\n", "User:"].')
    counted = sum(1 for s in stop if not (isinstance(s, str) and s == FALLBACK_STOP))
    if counted > STOP_MAX_COUNT:
        raise InvalidArgumentError(f"stop holds {counted} strings; at most {STOP_MAX_COUNT} are allowed.",
                                   hint=f"Pass the {STOP_MAX_COUNT} that matter most (every stop string is "
                                        "searched for after each token), or stop on a shorter common part.")
    for s in stop:
        if not isinstance(s, str):
            raise InvalidArgumentError(f"stop must contain only str, got {type(s).__name__} {s!r}.",
                                       hint='Pass e.g. stop=["\\n\\n", "User:"].')
        if not s:
            raise InvalidArgumentError("stop strings must not be empty.", hint="Remove the empty string from stop.")
        if len(s) > STOP_MAX_CHARS:
            raise InvalidArgumentError(f"a stop string has {len(s):,} characters; at most {STOP_MAX_CHARS} are "
                                       f"allowed (it starts {s[:40]!r}).",
                                       hint=f"Stop on its first {STOP_MAX_CHARS} characters or fewer: generation "
                                            "ends as soon as they appear.")
        check_unicode(s, "stop")
    return tuple(dict.fromkeys(stop))


def with_turn_stops(kwargs: dict[str, Any], template: Any) -> dict[str, Any]:
    """Generation arguments for a chat reply rendered with ``template`` (a ChatTemplate, or None): ``kwargs`` with
    the template's ``turn_stops`` added to the caller's ``stop`` (checked here), never replacing them."""
    extra = getattr(template, "turn_stops", ())
    if not extra:
        return kwargs
    return {**kwargs, "stop": list(validate_stop(kwargs.get("stop"))) + list(extra)}


# --- chat templates --------------------------------------------------------------------------------------
# The rules below follow what transformers' ``tokenizer.apply_chat_template(..., tokenize=False)`` does, so a model's
# own template renders the prompt it was trained on, byte for byte (tests/test_chat_templates.py renders real
# templates with both and compares): the environment (sandbox, trim_blocks/lstrip_blocks, loop controls, the
# ``generation`` tag), the filters and globals, and what the template is given (messages with None-valued keys
# dropped and reasoning copied under its common names, ``tools``, ``documents``, the special tokens, extra
# variables).
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# Where a reply ends under the plain fallback: the start of the user's next turn, which a model without a chat
# template goes on to write (chat adds it to the caller's stop strings; see ChatTemplate.turn_stops).
FALLBACK_STOP = "\nUser:"
# Names a message's reasoning arrives under; templates read ``reasoning_content`` (or ``thinking``, gpt-oss).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# What the template is always given; extra template variables may not take these names.
_RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_MESSAGE_HINT = ('Pass e.g. {"role": "user", "content": "Hi"}; content is a str, a list of parts such as '
                 '{"type": "text", "text": "Hi"} or (a tool result) a dict, and may be left out only on a message '
                 'with tool_calls.')


def _template_data(value: Any, where: str) -> Any:
    """A copy of ``value`` made of plain JSON-like values (str, int, float, bool, None, dict, list, tuple).

    Templates only ever see these: subclasses (str enums, numpy scalars, ...) lose their extra methods, which the
    sandbox does not know to be harmless; dataclasses and pydantic models (e.g. the OpenAI SDK's messages) become
    dicts. Anything else is refused, naming where it was found.
    """
    if isinstance(value, str):
        check_unicode(value, where)
        return value if type(value) is str else str.__str__(value)
    if value is None or type(value) in (int, float, bool):
        return value
    if isinstance(value, int):  # bool cannot be subclassed, so this is never a bool
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = _template_data(k, where)
            if not (key is None or isinstance(key, (str, int, float, bool))):
                raise InvalidArgumentError(f"{where} has a dict key of type {type(k).__name__} ({k!r}).",
                                           hint="Use str keys (JSON objects).")
            out[key] = _template_data(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [_template_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # a numpy scalar
        return _template_data(value.item(), where)
    if _is_record(value):
        import dataclasses

        if callable(getattr(value, "model_dump", None)):  # pydantic models
            return _template_data(value.model_dump(), where)
        return {f.name: _template_data(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    raise InvalidArgumentError(f"{where} is of type {type(value).__name__}, which a chat template cannot be given.",
                               hint="Use only JSON-like values: str, int, float, bool, None, dict, list.")


def _is_record(value: Any) -> bool:
    """A dataclass instance or a pydantic model: data with named fields that templates see as a dict."""
    import dataclasses

    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) \
        or callable(getattr(value, "model_dump", None))


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check and copy ``[{"role": ..., "content": ...}, ...]``; raises InvalidArgumentError naming the bad entry.

    What real templates accept passes: content as a str, a list of parts (dicts) or a dict (a tool result),
    assistant messages with ``tool_calls`` and no content, ``tool`` messages, extra keys (``name``,
    ``tool_call_id``, ...). As in
    transformers, keys whose value is None are dropped (templates handle a missing key, not a None one), and a
    message's reasoning is copied under ``thinking`` and ``reasoning_content``.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.",
                                   hint='Pass e.g. [{"role": "user", "content": "Hi"}].')
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if _is_record(m):  # a dataclass or pydantic message (e.g. from the OpenAI SDK)
            m = _template_data(m, where)
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"{where} must be a dict with 'role' and 'content', got {m!r}.",
                                       hint=_MESSAGE_HINT)
        m = {k: v for k, v in m.items() if v is not None}
        role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
        if not isinstance(role, str) or not role:
            raise InvalidArgumentError(f"{where} must have a non-empty str 'role', got {m!r}.", hint=_MESSAGE_HINT)
        if calls is not None and (not isinstance(calls, (list, tuple))
                                  or not all(isinstance(c, Mapping) for c in calls)):
            raise InvalidArgumentError(f"{where}['tool_calls'] must be a list of dicts, got {calls!r}.",
                                       hint='Pass e.g. [{"type": "function", "function": {"name": "get_weather", '
                                            '"arguments": {"city": "Paris"}}}].')
        if content is None:
            if not calls and not any(k in m for k in _REASONING_KEYS):
                raise InvalidArgumentError(f"{where} has no 'content' (and no tool_calls), got {m!r}.",
                                           hint=_MESSAGE_HINT)
        elif isinstance(content, (list, tuple)):
            bad = [p for p in content if not isinstance(p, Mapping)]
            if bad:
                raise InvalidArgumentError(f"{where}['content'] is a list, so its parts must be dicts; got {bad[0]!r}.",
                                           hint=_MESSAGE_HINT)
        elif not isinstance(content, (str, Mapping)):
            raise InvalidArgumentError(f"{where}['content'] must be a str, a list of parts or a dict, got "
                                       f"{type(content).__name__} {content!r}.", hint=_MESSAGE_HINT)
        m = _template_data(m, where)
        reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
        if reasoning is not None:  # the same placement transformers uses: `thinking` first unless already there
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _validate_list_of_dicts(value: Any, name: str, example: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        hint = f"Pass a list of dicts, e.g. {name}=[{example}]."
        if callable(value) or isinstance(value, (list, tuple)) and any(callable(v) for v in value):
            hint += " Python functions are not converted: pass their JSON schema."
        raise InvalidArgumentError(f"{name} must be a list of dicts, got {value!r}.", hint=hint)
    return _template_data(list(value), name)


def validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    """``tools`` as a list of JSON-schema dicts (or None), as chat templates want them."""
    return _validate_list_of_dicts(tools, "tools", '{"type": "function", "function": {"name": "get_weather", '
                                                   '"description": "...", "parameters": {"type": "object", ...}}}')


def validate_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """Extra template variables (``date_string``, ``enable_thinking``, ...) as a dict of plain values."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidArgumentError(f"chat template variables must be a dict with str keys, got {kwargs!r}.",
                                   hint='Pass e.g. {"date_string": "26 Jul 2024", "enable_thinking": False}.')
    taken = sorted(_RESERVED_VARIABLES.intersection(kwargs))
    if taken:
        raise InvalidArgumentError(f"chat template variables cannot be named {', '.join(taken)}.",
                                   hint="Pass messages, tools and documents as their own arguments.")
    return {k: _template_data(v, k) for k, v in kwargs.items()}


def _text_of(content: Any) -> str:
    """The text of a message's content for the plain fallback: a str, its text parts joined, or a dict as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return _tojson(content)
    return "".join(p["text"] for p in content or () if isinstance(p.get("text"), str))


class ChatTemplate:
    """Renders chat messages to a prompt string.

    With a jinja2 ``template`` (from tokenizer_config.json's ``chat_template``) it renders in jinja2's immutable
    sandbox (templates come with downloaded models and must not reach Python internals), the way transformers
    renders it (see the notes above). Without one it uses the plain fallback: one ``Role: content`` line per
    message, then ``Assistant:`` to ask for the reply.
    """

    def __init__(self, template: str | None, *, bos_token: str = "", eos_token: str = "",
                 name: str = "The model's chat template", tool_use: str | None = None) -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name  # how errors name it, e.g. "models/x/tokenizer_config.json's chat_template"
        self._compiled = None
        if template:
            self._compiled = _compile_bounded(template, name)
        # A second template for calls that pass tools (a named "tool_use" template, see from_tokenizer_config).
        self.tool_use_source = tool_use if tool_use and tool_use != template and self._compiled is not None else None
        self._tool_use = _compile_bounded(tool_use, f"{name} 'tool_use'") if self.tool_use_source else None

    @classmethod
    def from_tokenizer_config(cls, tokenizer_config: Mapping[str, Any], *, bos_token: str = "",
                              eos_token: str = "", name: str = "The model's chat template") -> "ChatTemplate":
        """The template(s) tokenizer_config.json's ``chat_template`` holds: one string, or a list of named
        templates (``[{"name": "default", "template": ...}, {"name": "tool_use", ...}, ...]``). With a list,
        renders that pass ``tools`` use ``tool_use`` and all others ``default`` (transformers' rule; without a
        ``default`` the first named template stands in, where transformers raises)."""
        named = named_chat_templates(tokenizer_config)
        return cls(chat_template_source(tokenizer_config), bos_token=bos_token, eos_token=eos_token, name=name,
                   tool_use=named.get("tool_use"))

    @property
    def is_fallback(self) -> bool:
        return self._compiled is None

    @property
    def turn_stops(self) -> tuple[str, ...]:
        """Stop strings that end a reply under this template, which chat adds to the caller's: the plain fallback's
        next-turn marker (FALLBACK_STOP), so a model without a template does not write the user's next turn;
        none for a model's own template (its end-of-turn token is an EOS id)."""
        return (FALLBACK_STOP,) if self._compiled is None else ()

    def render(self, messages: Any, *, add_generation_prompt: bool = True, tools: Any = None, documents: Any = None,
               **template_kwargs: Any) -> str:
        """The prompt for ``messages``.

        ``tools``: JSON-schema dicts of the functions the model may call; ``documents``: dicts (e.g. ``title`` and
        ``text``) for retrieval-augmented templates; ``template_kwargs``: any other variable the template reads
        (``date_string``, ``enable_thinking``, ...). A template that does not use one ignores it; so does the
        plain fallback.
        """
        messages = validate_messages(messages)
        tools = validate_tools(tools)
        documents = _validate_list_of_dicts(documents, "documents", '{"title": "...", "text": "..."}')
        variables = validate_template_kwargs(template_kwargs)
        if self._compiled is None:
            lines = [f"{FALLBACK_ROLES.get(m['role'], m['role'].capitalize())}: {_text_of(m.get('content'))}"
                     for m in messages]
            if add_generation_prompt:
                lines.append("Assistant:")
            return "\n".join(lines)
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError, UndefinedError

        # Given tools (even an empty list), a model's "tool_use" template renders, as in transformers.
        compiled = self._tool_use if tools is not None and self._tool_use is not None else self._compiled
        size = _text_size((messages, tools, documents, variables), TEMPLATE_MAX_CHARS // 4 + 1)
        if size > TEMPLATE_MAX_CHARS // 4:
            raise InvalidArgumentError(f"The messages, tools and documents hold more than {TEMPLATE_MAX_CHARS // 4:,} "
                                       "characters, more than a chat template is given to render.",
                                       hint="Send less text (no model's context holds this much anyway).")
        # Special tokens the model has, then the caller's variables (which may override them), as transformers does.
        context = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        context.update(variables)
        fix = "Fix chat_template in tokenizer_config.json or remove it to use the plain fallback."
        token = _BUDGET.set(_Budget())
        try:
            parts, total = [], 0
            for piece in compiled.generate(messages=messages, tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **context):
                total += len(piece)
                if total > TEMPLATE_MAX_CHARS:
                    raise _TemplateLimit(f"its output passed {TEMPLATE_MAX_CHARS:,} characters")
                parts.append(piece)
            return "".join(parts)
        except _TemplateRaised as exc:
            raise InvalidArgumentError(f"The chat template refused these messages: {str(exc)[:500]}",
                                       hint="Check the roles and their order (many templates want user/assistant "
                                            "turns alternating) and what the model supports (tools, tool calls).") \
                from None
        except _TemplateLimit as exc:
            raise ModelFormatError(f"{self.name} stopped: {exc} (limits: {TEMPLATE_MAX_STEPS:,} loop iterations and "
                                   f"calls, {TEMPLATE_MAX_CHARS:,} characters, {TEMPLATE_TIMEOUT_S:g} s).",
                                   hint=f"The template loops or grows without bound. {fix}") from None
        except SecurityError as exc:
            raise ModelFormatError(f"{self.name} tried an unsafe operation ({exc}).", hint=fix) from None
        except (RecursionError, MemoryError, ArithmeticError) as exc:  # ArithmeticError: OverflowError, 1/0, ...
            raise ModelFormatError(f"{self.name} failed to render ({type(exc).__name__}: {str(exc)[:200]}).",
                                   hint=fix) from None
        except (UndefinedError, TypeError, ValueError, LookupError, AttributeError) as exc:
            # The template worked on the data it was given in a way that data does not support, e.g. `content + "x"`
            # on list content or on a message without content: the messages have a shape this template does not
            # take. (Checked before TemplateError, of which UndefinedError is one.)
            raise InvalidArgumentError(f"The chat template cannot render these messages ({type(exc).__name__}: "
                                       f"{str(exc)[:300]}).", hint="This model's template may not support this "
                                                                   "message shape (list content, tool calls, a "
                                                                   "role); use plain str content and the roles it "
                                                                   "documents.") from None
        except TemplateError as exc:
            raise ModelFormatError(f"{self.name} failed to render ({exc}).", hint=fix) from None
        except Exception as exc:  # anything else a template can provoke is the template's fault, never a crash
            raise ModelFormatError(f"{self.name} failed to render ({type(exc).__name__}: {str(exc)[:200]}).",
                                   hint=fix) from None
        finally:
            _BUDGET.reset(token)


class _TemplateRaised(Exception):
    pass


def _raise_template_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _now() -> "datetime.datetime":
    """The time strftime_now formats (a function so tests can freeze it)."""
    return datetime.datetime.now()


def _strftime_now(fmt: str) -> str:
    return _now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Plain ``json.dumps``. jinja2's own tojson sorts keys and escapes ``<``, ``>``, ``&`` and ``'`` for HTML,
    which changes the prompt; templates are written against this one (non-ASCII kept, keys in the given order)."""
    import json

    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _DictGlobal:
    """The template's ``dict``: builds dicts (``dict(a=1)``, ``dict.fromkeys``) without handing it the ``dict``
    type itself, whose class attributes are a way out of the sandbox to guard against."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Iterable[Any], value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


# --- bounded rendering ---------------------------------------------------------------------------------------
# A chat template is code that comes with the model folder. jinja2's sandbox keeps it away from Python internals,
# but not from spending time or memory: two nested loops over range(100000) render for minutes, a string doubled in
# a loop fills memory. Every render therefore runs against a budget, checked at each loop iteration, call,
# attribute lookup and output: at most TEMPLATE_MAX_STEPS steps, TEMPLATE_MAX_CHARS characters in any one value
# (twice that in all output together, set-blocks and macros included) and TEMPLATE_TIMEOUT_S seconds. Real
# templates spend a few steps per message: the seven in tests/data/chat_templates take 30-74 steps for a 4-turn
# chat and 7,500-17,000 (9-41 ms) for 1,000 turns, so the bounds sit far above them, and a runaway template stops
# within about a second (two nested loops over range(100000): 0.1 s).
TEMPLATE_MAX_STEPS = 200_000
TEMPLATE_MAX_CHARS = 16 * 2**20
TEMPLATE_TIMEOUT_S = 1.0
# Lists, tuples and dicts: at most this many items each. And all strings and containers a render builds, added
# up: without this, a loop that keeps a new 16 MiB string per iteration would fill memory well within the steps and
# the second (a 1,000-turn conversation that re-concatenates its whole prompt every turn builds ~140 M).
TEMPLATE_MAX_ITEMS = 1_000_000
TEMPLATE_MAX_BUILT = 16 * TEMPLATE_MAX_CHARS
# Methods and filters whose integer arguments are output sizes (padding, indentation).
_PADDING = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs", "indent", "wordwrap", "tojson"})


class _TemplateLimit(Exception):
    """A render went over its budget (not an error of jinja2's: it must not be caught as one)."""


class _Budget:
    __slots__ = ("steps", "out", "built", "deadline")

    def __init__(self) -> None:
        import time

        self.steps = 0
        self.out = 0
        self.built = 0
        self.deadline = time.perf_counter() + TEMPLATE_TIMEOUT_S

    def step(self) -> None:
        self.steps += 1
        if self.steps > TEMPLATE_MAX_STEPS:
            raise _TemplateLimit(f"it took more than {TEMPLATE_MAX_STEPS:,} steps")
        if not self.steps & 255:
            import time

            if time.perf_counter() > self.deadline:
                raise _TemplateLimit(f"it ran for more than {TEMPLATE_TIMEOUT_S:g} s")

    def build(self, n: int) -> None:
        self.built += n
        if self.built > TEMPLATE_MAX_BUILT:
            raise _TemplateLimit(f"it built more than {TEMPLATE_MAX_BUILT:,} characters and items in all")

    def produced(self, n: int) -> None:
        self.out += n
        if self.out > 2 * TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"it produced more than {2 * TEMPLATE_MAX_CHARS:,} characters in all")


import contextvars as _contextvars  # noqa: E402  (stdlib, cheap; kept beside its one use)

_BUDGET: "_contextvars.ContextVar[_Budget | None]" = _contextvars.ContextVar("edgelm_template_budget", default=None)


def _text_size(value: Any, limit: int, _memo: dict[int, int] | None = None, _depth: int = 0) -> int:
    """About how many characters ``value`` renders to (str/tojson), counting a shared part each time it appears
    (a list nested in itself 40 times renders to 2**40 copies) but measuring it once; stops past ``limit``."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return 24
    if _depth > 200:
        return limit + 1
    memo = {} if _memo is None else _memo
    known = memo.get(id(value))
    if known is not None:
        return known
    items: Iterable[Any] = (x for kv in value.items() for x in kv) if isinstance(value, Mapping) else value
    total = 2
    for item in items:
        total += 2 + _text_size(item, limit - total, memo, _depth + 1)
        if total > limit:
            return total
    memo[id(value)] = total
    return total


def _limit(value: Any) -> int:
    return TEMPLATE_MAX_CHARS if isinstance(value, str) else TEMPLATE_MAX_ITEMS


def _check_size(value: Any, what: str = "a value") -> Any:
    """``value`` (a result just built), refused when it is too large; its size counts toward the render's total."""
    if isinstance(value, (str, list, tuple, dict)):
        n, limit = len(value), _limit(value)
        if n > limit:
            raise _TemplateLimit(f"{what} grew past {limit:,} {'characters' if isinstance(value, str) else 'items'}")
        budget = _BUDGET.get()
        if budget is not None:
            budget.build(n)
    return value


def _check_rendering(value: Any) -> None:
    """Refuse to turn ``value`` into text when the text would be too long (nested lists that double in a loop)."""
    if not isinstance(value, str) and _text_size(value, TEMPLATE_MAX_CHARS) > TEMPLATE_MAX_CHARS:
        raise _TemplateLimit(f"a value would render to more than {TEMPLATE_MAX_CHARS:,} characters")


def _format_widths(fmt: str) -> tuple[int, bool]:
    """(sum of the widths and precisions, whether one is ``*``) of the conversions in a %-format or
    str.format string; the literal text between them does not count."""
    import re
    import string

    total, star = 0, False
    for m in re.finditer(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?", fmt):
        for g in m.groups():
            if g == "*":
                star = True
            elif g:
                total += int(g) if len(g) < 12 else TEMPLATE_MAX_CHARS + 1
    try:
        specs = [spec for _, field, spec, _ in string.Formatter().parse(fmt) if field is not None and spec]
    except ValueError:  # not a valid str.format string: it can only be a %-format, or fail
        specs = []
    for spec in specs:
        for d in re.findall(r"\d+", spec):
            total += int(d) if len(d) < 12 else TEMPLATE_MAX_CHARS + 1
        star = star or "{" in spec
    return total, star


def _check_format(fmt: Any, args: Sequence[Any]) -> None:
    """Widths and precisions in a %-format or str.format string are output sizes: refuse ones that add up to too
    much (``"%999999999d"``, ``"{:>999999999}"``), and widths taken from the arguments that are too large."""
    if isinstance(fmt, str):
        total, star = _format_widths(fmt)
        if total > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"a format string asks for more than {TEMPLATE_MAX_CHARS:,} characters")
        if star:
            _check_sizes(args)
    for a in args:
        _check_rendering(a)


def _check_sizes(args: Iterable[Any]) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"an output size of {a:,} was asked for (more than {TEMPLATE_MAX_CHARS:,})")


def _precheck(name: str, target: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Before a call that could build a huge value in one go (in C, where no step is counted), check its size."""
    if name in _PADDING:
        _check_sizes(args)
        _check_sizes(kwargs.values())
    elif name in ("split", "rsplit") and isinstance(target, str):
        sep = args[0] if args else kwargs.get("sep")
        parts = target.count(sep) + 1 if isinstance(sep, str) and sep else len(target) // 2 + 1
        if parts > TEMPLATE_MAX_ITEMS:
            raise _TemplateLimit(f"str.{name} would build more than {TEMPLATE_MAX_ITEMS:,} items")
    elif name in ("join", "replace") and isinstance(target, str):
        if name == "join" and args and isinstance(args[0], (list, tuple)):
            items = args[0]
            est = len(target) * len(items) + sum(len(x) for x in items if isinstance(x, str))
        elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
            est = (len(target) + 1) * max(1, len(args[1]))
        else:
            est = 0
        if est > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"str.{name} would build more than {TEMPLATE_MAX_CHARS:,} characters")


def _bounded_filter(name: str, fn: Any) -> Any:
    """A filter that counts a step, checks sizes before (see _precheck) and after, within a render's budget."""
    import functools

    from jinja2.utils import _PassArg

    passes = _PassArg.from_obj(fn) is not None  # context / eval context first: the value is the second argument

    @functools.wraps(fn)  # keeps jinja's pass_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.step()
            rest = args[1:] if passes else args
            value, params = (rest[0], rest[1:]) if rest else (None, ())
            if name in ("join", "replace"):
                _precheck(name, params[0] if name == "join" and params else "" if name == "join" else value,
                          [value] if name == "join" else params, kwargs)
            elif name == "format":
                _check_format(value, list(params) + list(kwargs.values()))
            elif name in ("string", "tojson", "pprint", "e", "escape", "forceescape", "safe", "trim", "list"):
                _check_rendering(value)
            if name in _PADDING:
                _check_sizes(params)
                _check_sizes(kwargs.values())
            if name == "tojson" and any(isinstance(v, int) and v > 64 for v in (*params[:1], kwargs.get("indent"))):
                raise _TemplateLimit("tojson's indent is over 64")
        return _check_size(fn(*args, **kwargs), f"the result of |{name}")
    return bounded


def _bounded_environment_class() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox with every loop, call, lookup, operator and output counted against the render's budget."""

        # Operators whose result can be far larger than their operands (the rest cannot).
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            budget = _BUDGET.get()
            if budget is not None:
                budget.step()
                method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format at lookup
                name, target = getattr(method, "__name__", ""), getattr(method, "__self__", None)
                if name in ("format", "format_map") and isinstance(target, str):
                    values = list(args[0].values()) if name == "format_map" and args and isinstance(args[0], Mapping) \
                        else [*args, *kwargs.values()]
                    _check_format(target, values)
                else:
                    _precheck(name, target, args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if _BUDGET.get() is not None:
                _BUDGET.get().step()  # type: ignore[union-attr]
                if operator == "*":
                    seq, n = (left, right) if isinstance(right, int) else (right, left)
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _limit(seq):
                        raise _TemplateLimit(f"a repetition would build more than {_limit(seq):,} items")
                elif operator == "**":
                    if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                            right * max(1, abs(left).bit_length()) > 64 * 1024:
                        raise _TemplateLimit(f"{left} ** {right} is too large a number")
                elif operator == "+":
                    if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) and \
                            len(left) + len(right) > _limit(left):
                        raise _TemplateLimit(f"a sum would build more than {_limit(left):,} items")
                elif operator == "%" and isinstance(left, str):
                    _check_format(left, right if isinstance(right, tuple) else [right])
            return _check_size(super().call_binop(context, operator, left, right), "an operator's result")

        def getattr(self, obj: Any, attribute: str) -> Any:
            budget = _BUDGET.get()
            if budget is not None:
                budget.step()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            budget = _BUDGET.get()
            if budget is not None:
                budget.step()
            return super().getitem(obj, argument)


    return BoundedSandbox


# The counting hooks _bound_ast puts into every compiled template. They are filters: a compiled template calls a
# filter directly (no sandbox call check, so they cost little), and a template cannot rebind one the way `{% set %}`
# shadows a global name.
def _loop_filter(iterable: Any) -> Any:
    budget = _BUDGET.get()
    return iterable if budget is None else _counted(iterable, budget)


def _counted(iterable: Any, budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.step()
        yield item


def _out_filter(value: Any) -> Any:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        _check_rendering(value)
        budget.produced(len(value) if isinstance(value, str) else 24)
    return value


def _concat_filter(parts: Sequence[Any]) -> str:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        for part in parts:
            _check_rendering(part)
        size = sum(len(p) if isinstance(p, str) else 24 for p in parts)
        if size > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"a ~ concatenation would build more than {TEMPLATE_MAX_CHARS:,} characters")
        budget.build(size)
    from jinja2.runtime import markup_join

    return markup_join(parts)


_HOOKS = {"edgelm_loop": _loop_filter, "edgelm_out": _out_filter, "edgelm_concat": _concat_filter}


def _bound_ast(tree: Any) -> Any:
    """Route every for-loop's iterable, ``{{ output }}`` (literal text too: in a loop inside a macro or set-block it
    adds up unseen) and ``~`` through the counting hooks above."""
    from jinja2 import nodes

    def via(hook: str, node: Any) -> Any:
        return nodes.Filter(node, hook, [], [], None, None, lineno=node.lineno)

    for node in list(tree.find_all(nodes.For)):
        node.iter = via("edgelm_loop", node.iter)
    for node in list(tree.find_all(nodes.Output)):
        node.nodes = [via("edgelm_out", child) for child in node.nodes]
    for node in list(tree.find_all(nodes.Concat)):
        node.nodes = [via("edgelm_concat", nodes.Tuple(node.nodes, "load", lineno=node.lineno))]
    return tree


def _compile_bounded(source: str, name: str) -> Any:
    """Compile a chat template for bounded rendering; refuse what no chat template can use (include, import,
    extends: there is no loader, so they could only fail at render time with a TypeError)."""
    from jinja2 import TemplateError, nodes

    env = _environment()
    fix = "Fix chat_template in tokenizer_config.json or remove it to use the plain fallback."
    try:
        tree = env.parse(source)
        for kind, what in ((nodes.Include, "include"), (nodes.Import, "import"), (nodes.FromImport, "from-import"),
                           (nodes.Extends, "extends")):
            if next(tree.find_all(kind), None) is not None:
                raise ModelFormatError(f"{name} uses {{% {what} %}}, which chat templates cannot (there is nothing "
                                       "to load other templates from).", hint=fix)
        code = env.compile(_bound_ast(tree), raw=False)
        return env.template_class.from_code(env, code, env.make_globals(None), None)
    except TemplateError as exc:
        raise ModelFormatError(f"{name} does not compile ({exc}).", hint=fix) from None
    except (RecursionError, MemoryError) as exc:  # a pathologically nested template
        raise ModelFormatError(f"{name} does not compile ({type(exc).__name__}).", hint=fix) from None


def _environment() -> Any:
    """The jinja2 environment chat templates compile in (one per process)."""
    global _ENV
    if _ENV is None:
        from jinja2.ext import Extension, loopcontrols
        from jinja2.exceptions import SecurityError
        from jinja2.nodes import CallBlock
        from jinja2.utils import Namespace

        class GenerationTag(Extension):
            """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for training masks; here it
            only renders its body, in a scope of its own like the call block transformers makes of it."""
            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

            def _render_body(self, caller: Any) -> str:
                return caller()

        def check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a chat template may not store {name!r} on a namespace (names starting "
                                    f"with '_' are refused).")

        class SafeNamespace(Namespace):
            """``namespace()`` that refuses attribute names starting with '_'."""

            def __init__(*args: Any, **kwargs: Any) -> None:  # `self` is args[0], so `namespace(self=1)` works
                attrs = dict(*args[1:], **kwargs)
                for name in attrs:
                    check_name(name)
                Namespace.__init__(args[0], attrs)

            def __setitem__(self, name: str, value: Any) -> None:
                check_name(name)
                Namespace.__setitem__(self, name, value)

        env = _bounded_environment_class()(trim_blocks=True, lstrip_blocks=True,
                                           extensions=[GenerationTag, loopcontrols])
        env.filters["tojson"] = _tojson
        env.filters.update({k: _bounded_filter(k, f) for k, f in env.filters.items()})
        env.filters.update(_HOOKS)
        env.globals.update(raise_exception=_raise_template_exception, strftime_now=_strftime_now,
                           dict=_DictGlobal(), namespace=SafeNamespace)
        _ENV = env
    return _ENV


_ENV: Any = None


def named_chat_templates(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """``chat_template`` in its list form (``[{"name": "default", "template": "..."}, ...]``) as {name: source}:
    entries without a str name or a non-blank str template are skipped; a repeated name keeps its last template
    (as transformers reads it). {} for a single template or none."""
    tpl = tokenizer_config.get("chat_template")
    if not isinstance(tpl, list):
        return {}
    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping) and isinstance(t.get("name"), str)}
    return {k: v for k, v in named.items() if isinstance(v, str) and v.strip()}


def chat_template_source(tokenizer_config: Mapping[str, Any]) -> str | None:
    """The jinja2 source of the model's (default) chat template, or None. Handles the list-of-named-templates form:
    the one named "default", else the first."""
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):
        named = named_chat_templates(tokenizer_config)
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None
