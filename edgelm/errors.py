"""Typed errors. Every error edgelm raises on purpose is an ``EdgeLMError`` and says what to do next.

Catch ``edgelm.errors.EdgeLMError`` for "anything edgelm refused", or a subclass for one kind of problem.
Subclasses also derive from the matching built-in (``ValueError``, ``FileNotFoundError``, ...) so code
that already catches those keeps working.
"""
from __future__ import annotations


class EdgeLMError(Exception):
    """Base class of every error edgelm raises deliberately."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}" if hint else message)


# --- model folders -------------------------------------------------------------------------------
class ModelError(EdgeLMError):
    """A model folder cannot be used."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model folder (or a file it needs) does not exist."""


class ChecksumError(ModelError):
    """A file in a model folder does not match the sha256/size recorded in its manifest (edgelm.json)."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.path = path
        super().__init__(message, hint=hint)


class ModelFormatError(ModelError):
    """A model folder is malformed: bad JSON, unknown format version, an ONNX graph that does not load."""


class TokenizerError(ModelError):
    """The tokenizer is missing or cannot be read."""


# --- arguments -----------------------------------------------------------------------------------
class InvalidArgumentError(EdgeLMError, ValueError):
    """An argument is out of range or of the wrong type. Raised before any work is done."""


class ContextLengthError(InvalidArgumentError):
    """Prompt plus requested new tokens do not fit in the model's context window."""

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, context_length: int,
                 hint: str | None = None, max_new_tokens_given: bool = True):
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        # False when max_new_tokens is a default the caller never set (then the prompt alone is too long)
        self.max_new_tokens_given = max_new_tokens_given
        super().__init__(message, hint=hint)


# --- export / training ---------------------------------------------------------------------------
class ExportError(EdgeLMError):
    """The export pipeline cannot continue (bad source, failed verification, quality gate...)."""


class UnsupportedArchitectureError(ExportError):
    """The source model's architecture is not one edgelm can export."""


class QualityGateError(ExportError):
    """The quantized model lost more quality than allowed; rerun with --force to write it anyway."""


class TrainingError(EdgeLMError):
    """Training, distillation or tokenizer training cannot continue (bad corpus, mismatched tokenizers...)."""


class OutOfDiskError(EdgeLMError, OSError):
    """A write failed because the disk is full; earlier files were left intact."""


# --- hybrid / cloud ------------------------------------------------------------------------------
class CloudError(EdgeLMError):
    """The cloud endpoint could not give an answer (after retries)."""


class CloudTimeoutError(CloudError, TimeoutError):
    """The cloud endpoint did not answer in time."""


class CloudHTTPError(CloudError):
    """The cloud endpoint answered with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int | None = None, hint: str | None = None):
        self.status_code = status_code
        super().__init__(message, hint=hint)


class CloudResponseError(CloudError):
    """The cloud endpoint answered with data that is not a valid chat completion, or its stream was cut off
    before the end (then ``stream_cut`` is True)."""

    stream_cut: bool = False


class RoutingError(EdgeLMError):
    """Neither the local model nor the cloud could answer."""


__all__ = [name for name, obj in globals().items() if isinstance(obj, type) and issubclass(obj, EdgeLMError)]
