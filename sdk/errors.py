"""Typed errors of the SDK. Each message is one line that says what to do.

Every error the SDK raises on purpose derives from PipmmError, so a caller (or the
CLI) can catch one type and print `str(err)`.
"""


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
    """A generation argument (max_new_tokens, temperature, top_p, seed) is out of range."""


class BundleError(PipmmError):
    """The bundle is missing, damaged, tampered with or of an unknown format."""


class BackendError(PipmmError, RuntimeError):
    """The requested backend or device is not available here."""


class ExportError(PipmmError):
    """The checkpoint cannot be exported (unsupported architecture, missing prompt MLP...)."""


class ContextOverflowError(PromptError):
    """The request does not fit in the model's context window."""
