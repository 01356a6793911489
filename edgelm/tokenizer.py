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
from typing import Any, Iterable, Mapping, Sequence

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


def validate_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings as a tuple; ``None`` means none. Raises InvalidArgumentError for anything but str/list[str]."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise InvalidArgumentError(f"stop must be a str or a list of str, got {type(stop).__name__}.",
                                   hint='Pass e.g. stop="\\n" or stop=["\\n\\n", "User:"].')
    for s in stop:
        if not isinstance(s, str):
            raise InvalidArgumentError(f"stop must contain only str, got {type(s).__name__} {s!r}.",
                                       hint='Pass e.g. stop=["\\n\\n", "User:"].')
        if not s:
            raise InvalidArgumentError("stop strings must not be empty.", hint="Remove the empty string from stop.")
        check_unicode(s, "stop")
    return tuple(stop)


# --- chat templates --------------------------------------------------------------------------------------
# The rules below follow what transformers' ``tokenizer.apply_chat_template(..., tokenize=False)`` does, so a model's
# own template renders the prompt it was trained on, byte for byte (tests/test_chat_templates.py renders real
# templates with both and compares): the environment (sandbox, trim_blocks/lstrip_blocks, loop controls, the
# ``generation`` tag), the filters and globals, and what the template is given (messages with None-valued keys
# dropped and reasoning copied under its common names, ``tools``, ``documents``, the special tokens, extra
# variables).
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
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

    def __init__(self, template: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None
        if template:
            from jinja2 import TemplateError

            try:
                self._compiled = _environment().from_string(template)
            except TemplateError as exc:
                raise ModelFormatError(f"The model's chat template does not compile ({exc}).",
                                       hint="Fix chat_template in tokenizer_config.json or remove it to use the "
                                            "plain fallback.") from None

    @property
    def is_fallback(self) -> bool:
        return self._compiled is None

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

        # Special tokens the model has, then the caller's variables (which may override them), as transformers does.
        context = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        context.update(variables)
        try:
            return self._compiled.render(messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **context)
        except _TemplateRaised as exc:
            raise InvalidArgumentError(f"The chat template refused these messages: {exc}",
                                       hint="Check the roles and their order (many templates want user/assistant "
                                            "turns alternating) and what the model supports (tools, tool calls).") \
                from None
        except SecurityError as exc:
            raise ModelFormatError(f"The chat template tried an unsafe operation ({exc}).",
                                   hint="Fix chat_template in tokenizer_config.json.") from None
        except (UndefinedError, TypeError, ValueError, LookupError, AttributeError) as exc:
            # The template worked on the data it was given in a way that data does not support, e.g. `content + "x"`
            # on list content or on a message without content: the messages have a shape this template does not
            # take. (Checked before TemplateError, of which UndefinedError is one.)
            raise InvalidArgumentError(f"The chat template cannot render these messages ({type(exc).__name__}: "
                                       f"{exc}).", hint="This model's template may not support this message shape "
                                                        "(list content, tool calls, a role); use plain str "
                                                        "content and the roles it documents.") from None
        except TemplateError as exc:
            raise ModelFormatError(f"The chat template failed to render ({exc}).",
                                   hint="Fix chat_template in tokenizer_config.json.") from None


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


def _environment() -> Any:
    """The jinja2 environment chat templates compile in (one per process)."""
    global _ENV
    if _ENV is None:
        from jinja2.ext import Extension, loopcontrols
        from jinja2.exceptions import SecurityError
        from jinja2.nodes import CallBlock
        from jinja2.sandbox import ImmutableSandboxedEnvironment
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

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationTag, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_template_exception, strftime_now=_strftime_now,
                           dict=_DictGlobal(), namespace=SafeNamespace)
        _ENV = env
    return _ENV


_ENV: Any = None


def chat_template_source(tokenizer_config: Mapping[str, Any]) -> str | None:
    """The jinja2 source of the model's chat template, or None. Handles the list-of-named-templates form."""
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None
