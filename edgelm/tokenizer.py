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
    return tuple(stop)


# --- chat templates --------------------------------------------------------------------------------------
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check ``[{"role": ..., "content": ...}, ...]``; raises InvalidArgumentError naming the bad entry."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.",
                                   hint='Pass e.g. [{"role": "user", "content": "Hi"}].')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}.",
                                       hint='Pass e.g. {"role": "user", "content": "Hi"}.')
        out.append(dict(m))
    return out


class ChatTemplate:
    """Renders chat messages to a prompt string.

    With a jinja2 ``template`` (from tokenizer_config.json's ``chat_template``) it renders in jinja2's immutable
    sandbox (templates come with downloaded models and must not reach Python internals). Without one it uses the
    plain fallback: one ``Role: content`` line per message, then ``Assistant:`` to ask for the reply.
    """

    def __init__(self, template: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None
        if template:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = env.from_string(template)
            except TemplateError as exc:
                raise ModelFormatError(f"The model's chat template does not compile ({exc}).",
                                       hint="Fix chat_template in tokenizer_config.json or remove it to use the "
                                            "plain fallback.") from None

    @property
    def is_fallback(self) -> bool:
        return self._compiled is None

    def render(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        messages = validate_messages(messages)
        if self._compiled is None:
            lines = [f"{FALLBACK_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
            if add_generation_prompt:
                lines.append("Assistant:")
            return "\n".join(lines)
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except _TemplateRaised as exc:
            raise InvalidArgumentError(f"The chat template refused these messages: {exc}",
                                       hint="Check the roles and their order (many templates want user/assistant "
                                            "turns alternating).") from None
        except SecurityError as exc:
            raise ModelFormatError(f"The chat template tried an unsafe operation ({exc}).",
                                   hint="Fix chat_template in tokenizer_config.json.") from None
        except TemplateError as exc:
            raise ModelFormatError(f"The chat template failed to render ({exc}).",
                                   hint="Fix chat_template in tokenizer_config.json.") from None


class _TemplateRaised(Exception):
    pass


def _raise_template_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


def chat_template_source(tokenizer_config: Mapping[str, Any]) -> str | None:
    """The jinja2 source of the model's chat template, or None. Handles the list-of-named-templates form."""
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None
