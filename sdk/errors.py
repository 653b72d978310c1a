"""Typed errors of the SDK. Each message is one line that says what to do.

Every error the SDK raises on purpose derives from PipmmError, so a caller (or the
CLI) can catch one type and print `str(err)`. What a request raises is documented in
docs/robustness.md; anything else that escapes a backend is wrapped in a BackendError
(the original stays attached as __cause__ for debugging).
"""

from __future__ import annotations

from contextlib import contextmanager


class PipmmError(Exception):
    """Base class: a one-line, actionable message."""

    def __init__(self, message: str):
        # One line: newlines inside a message would break log parsers and the CLI.
        super().__init__(" ".join(str(message).split()))


class ImageError(PipmmError, ValueError):
    """The image could not be read or has an unsupported form."""


class PromptError(PipmmError, ValueError):
    """The prompt is empty, too long for the context, or otherwise unusable."""


class GenerationArgumentError(PipmmError, ValueError):
    """A generation argument (max_new_tokens, min_new_tokens, temperature, top_p, seed) is out of range."""


class BundleError(PipmmError):
    """The bundle is missing, damaged, tampered with or of an unknown format."""


class BackendError(PipmmError, RuntimeError):
    """The requested backend or device is not available here."""


class ExportError(PipmmError):
    """The checkpoint cannot be exported (unsupported architecture, missing prompt MLP...)."""


class ContextOverflowError(PromptError):
    """The request does not fit in the model's context window."""


class PipelineBusyError(PipmmError, RuntimeError):
    """This thread already holds the Pipeline (an unfinished stream()): a second request would wait forever."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """`Type: message` of any exception, on one line and at most `limit` characters."""
    return " ".join(f"{type(err).__name__}: {err}".split())[:limit]


@contextmanager
def typed_errors(what: str):
    """Let PipmmError through; turn anything else a request raises (an ONNX Runtime failure on a
    bundle that passed its checks, an out-of-memory...) into a one-line BackendError."""
    try:
        yield
    except PipmmError:
        raise
    except Exception as err:
        raise BackendError(f"{what} failed ({one_line(err)}): if the bundle was exported by another "
                           "version, re-export it; otherwise report this with the bundle's manifest") from err
