"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP status.

Every request the server refuses ends as an ApiError; SDK errors are mapped by type (STATUS_OF).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (BackendError, BundleError, ContextOverflowError, GenerationArgumentError, ImageError,
                      PipelineBusyError, PipmmError, PromptError)
from ..regions import RegionError


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __post_init__(self):
        self.message = " ".join(str(self.message).split())  # one line, as every SDK message
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Most specific first: the first isinstance match decides.
STATUS_OF: list[tuple[type, int, str, str | None]] = [
    (ContextOverflowError, 400, "invalid_request_error", "context_length_exceeded"),
    (RegionError, 400, "invalid_request_error", "invalid_region"),  # e.g. a box outside the image's center crop
    (PromptError, 400, "invalid_request_error", "invalid_prompt"),
    (ImageError, 400, "invalid_request_error", "invalid_image"),
    (GenerationArgumentError, 400, "invalid_request_error", "invalid_value"),
    (BundleError, 400, "invalid_request_error", "unsupported_by_bundle"),  # e.g. inhibit on a bundle without CMAI
    (PipelineBusyError, 503, "server_error", "busy"),
    (BackendError, 500, "server_error", "backend_error"),
    (PipmmError, 500, "server_error", None),
]


def from_sdk(err: PipmmError) -> ApiError:
    for kind, status, error_type, code in STATUS_OF:
        if isinstance(err, kind):
            return ApiError(status, str(err), error_type, code=code)
    raise TypeError(f"not a PipmmError: {err!r}")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# What writing to a client that went away (or stopped reading for Handler.timeout) raises.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
