"""The server's settings (`pipmm serve` options), one dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    bundle: str | None = None  # None: the embedded default model
    host: str = "127.0.0.1"  # localhost only unless asked
    port: int = 8000  # 0: any free port (printed on the first line)
    workers: int = 1  # Pipelines, each serving one request at a time
    max_queue: int = 16  # requests waiting for a worker; one more gets 429
    api_key: str | None = None  # None: no Authorization check
    model_name: str | None = None  # None: the bundle directory's name
    backend: str = "auto"
    device: str = "auto"
    max_body_bytes: int = 20 * 1024 * 1024  # a request body above this gets 413 before it is read
    media_dir: Path | None = None  # image_url may name files under this directory (file:// or a path)
    allow_remote_images: bool = False  # image_url may be http(s):// (fetched with remote_timeout_s)
    remote_timeout_s: float = 10.0
    max_stop_strings: int = 4  # as OpenAI

    @property
    def served_model(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.bundle).resolve().name if self.bundle else "pipmm-default"
