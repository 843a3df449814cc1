"""Service options and their defaults, and the ``serve`` command line (no web framework imported here)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..cpu import usable_cores
from ..field_options import FieldOptions, option
from ..image_io import DEFAULT_MAX_PIXELS

MB = 1024 * 1024
SERVE_PACKAGES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


class ServeError(Exception):
    """The service cannot start (folder locked, bad option, missing package): one line for the user."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything a server needs besides its models; every limit has a default (see README, "Limits")."""

    galleries: Path
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8080, "port", why="0 picks a free one")
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_upload_bytes: int = 10 * MB
    request_timeout_s: float = option(30.0, "time budget of one request in seconds, else 503",
                                      flag="--request-timeout")
    max_batch: int = option(32, "most faces in one recognizer call")
    batch_wait_ms: float = option(5.0, "longest wait for more faces before a recognizer call")
    max_queue: int = option(512, "faces waiting for the recognizer before requests get 503")
    max_inflight: int = option(64, "requests handled at once before others get 503")
    workers: int = option(default_factory=usable_cores, help="threads decoding and detecting",
                          shown="usable CPU cores")
    model_threads: int = option(1, "threads inside each model call, 0 = the backend's default",
                                why="requests run in parallel instead")
    max_images: int = option(16, "most images in one enrolment")
    max_top_k: int = 100
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest image (width × height) decoded")
    #: log every request (the help describes the switch, ``--no-access-log``)
    access_log: bool = option(True, "do not log every request")
    log_level: str = option("info", "log level", choices=("critical", "error", "warning", "info", "debug"))

    def __post_init__(self):
        checks = {"port": 0 <= self.port <= 65535, "max_upload_bytes": self.max_upload_bytes > 0,
                  "request_timeout_s": self.request_timeout_s > 0, "max_batch": self.max_batch >= 1,
                  "batch_wait_ms": self.batch_wait_ms >= 0, "max_queue": self.max_queue >= 1,
                  "max_inflight": self.max_inflight >= 1, "workers": self.workers >= 1,
                  "max_images": self.max_images >= 1, "max_top_k": self.max_top_k >= 1,
                  "max_pixels": self.max_pixels >= 1, "model_threads": self.model_threads >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ServeError(f"invalid value for {', '.join(bad)}: {', '.join(str(getattr(self, b)) for b in bad)}")

    @property
    def shutdown_grace_s(self) -> int:
        """How long SIGTERM waits for in-flight requests: their time budget plus a margin."""
        return int(self.request_timeout_s) + 5


def read_api_keys(path: str | os.PathLike) -> tuple[str, ...]:
    """API keys from a file, one per line (blank lines and ``#`` comments ignored); at least one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"--api-key-file {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ServeError(f"--api-key-file {path}: no key in the file")
    if any(len(k) < 16 for k in keys):
        raise ServeError(f"--api-key-file {path}: keys must be at least 16 characters")
    return keys


#: the ``serve`` options that set a :class:`ServeConfig` field directly
OPTIONS = FieldOptions(ServeConfig)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` command's own options (the model options come from the CLI's shared group)."""
    OPTIONS.add(p, "host", "port")
    p.add_argument("--galleries", required=True, help="folder of gallery files (<name>.npz); created if absent")
    p.add_argument("--api-key-file", help="require one of the keys in this file (one per line) on /v1 and /metrics")
    upload = OPTIONS.default("max_upload_bytes")
    p.add_argument("--max-upload-mb", type=float, default=upload / MB,
                   help=f"largest request body in MiB (default {upload // MB})")
    OPTIONS.add(p)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """A :class:`ServeConfig` from parsed ``serve`` arguments."""
    return OPTIONS.build(args, galleries=Path(args.galleries), max_upload_bytes=int(args.max_upload_mb * MB),
                         api_keys=read_api_keys(args.api_key_file) if args.api_key_file else ())


def check_packages() -> None:
    """:class:`ServeError` naming the missing package when the ``serve`` extra is not installed."""
    import importlib.util

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeError(f"the serve command needs {', '.join(missing)}: pip install 'facekit[serve]'")
