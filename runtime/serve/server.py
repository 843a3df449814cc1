"""Start-up and shutdown of the service.

Start-up order keeps a doomed start fast: lock the galleries folder and bind the port first (a second
server on the folder, or a port in use, fails in milliseconds with one line), then load and warm up the
models, then load the galleries. The line ``facekit serve: listening on http://HOST:PORT ...`` is printed
on stdout once requests are served (with ``--port 0`` it names the port picked).

Shutdown: SIGTERM (or SIGINT) stops accepting connections, lets in-flight requests finish (up to their
time budget plus 5 s), drains the micro-batcher and exits with status 0 for SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from typing import Any, Callable

import numpy as np

from ..image_io import silence_native_decoder_messages
from .config import ServeConfig, ServeError, check_packages, config_from_args
from .galleries import FolderLock, GalleryStore
from .ready import READY_PREFIX

log = logging.getLogger("facekit.serve")


def serve(args: argparse.Namespace, make_pipeline: Callable[[dict], Any]) -> int:
    """``python -m runtime serve``: run the service until SIGTERM/SIGINT; ``make_pipeline(model_options)``
    builds the ``FacePipeline`` (after the galleries folder is locked, so a second server fails before loading
    any model). Returns the exit status."""
    config = config_from_args(args)
    check_packages()
    return run(config, make_pipeline)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon); :class:`ServeError` if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def warm_up(pipeline) -> None:
    """Run every model once so the first request does not pay for lazy initialisation."""
    pipeline.detect(np.zeros((64, 64, 3), np.uint8))
    h, w = pipeline.spec.input_size
    pipeline.embed_aligned(np.zeros((1, h, w, 3), np.uint8))


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("facekit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def run(config: ServeConfig, make_pipeline: Callable[[dict], Any]) -> int:
    """Serve until SIGTERM/SIGINT (see the module docstring); ``make_pipeline(model_options)`` builds the
    pipeline. Returns the exit status."""
    import uvicorn

    from .app import Service, create_app
    from .limits import Gate
    from .metrics import ServeMetrics

    _configure_logging(config.log_level)
    t0 = time.perf_counter()
    lock = FolderLock(config.galleries)
    sock = None
    try:
        sock = listen(config.host, config.port)
        # decoders' stderr chatter stays: muting fd 2 process-wide would also swallow other threads' logs
        silence_native_decoder_messages(False)
        pipeline = make_pipeline({"threads": config.model_threads} if config.model_threads else {})
        warm_up(pipeline)
        metrics = ServeMetrics()
        metrics.set_models(pipeline.providers)
        store = GalleryStore(lock, pipeline, on_change=lambda n, g: metrics.set_gallery(n, len(g), g.num_embeddings))
        service = Service(config, pipeline, store, metrics)
        host, port = sock.getsockname()[:2]

        def ready() -> None:
            models = ", ".join(f"{k} on {v}" for k, v in pipeline.providers.items())
            print(f"{READY_PREFIX}http://{host}:{port} ({models}; {len(store.names)} galleries in "
                  f"{store.folder}; ready in {time.perf_counter() - t0:.1f} s)", flush=True)

        gate = Gate(create_app(service, ready), metrics, api_keys=config.api_keys,
                    max_upload_bytes=config.max_upload_bytes, request_timeout_s=config.request_timeout_s,
                    max_inflight=config.max_inflight)
        server = uvicorn.Server(uvicorn.Config(
            gate, log_level=config.log_level, access_log=config.access_log, lifespan="on",
            timeout_graceful_shutdown=config.shutdown_grace_s))
        # uvicorn re-raises the signal after its graceful shutdown; this handler turns SIGTERM into exit 0
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        if sock is not None:
            sock.close()
        lock.release()
