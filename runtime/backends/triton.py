"""Triton Inference Server backend: a model served by Triton, addressed as ``triton://HOST:PORT/MODEL[/VERSION]``.

Batches go over gRPC (``tritonclient[grpc]``, the ``triton`` extra; imported only when such a URL is loaded).
Shapes, dtypes and the largest batch come from the served model's config (``max_batch_size``); the facekit
metadata (preprocessing, threshold) from its config ``parameters``, which ``export/to_triton.py`` writes.
Loading checks that the server is live and the model ready, and raises :class:`ModelLoadError` naming the URL
otherwise. Each thread talks through its own client (Triton's Python clients are not thread-safe).
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..messages import first_line
from ..optional_imports import require_module
from .base import Backend, ModelLoadError, register

SCHEME = "triton://"
#: Seconds one gRPC call may take (server checks and each inference request).
DEFAULT_TIMEOUT_S = 60.0
INSTALL_HINT = "tritonclient is not installed: pip install 'facekit[triton]' (tritonclient[grpc])"


@dataclass(frozen=True)
class TritonURL:
    """A parsed ``triton://HOST:PORT/MODEL[/VERSION]`` address (version "" = the newest ready one)."""

    host: str
    port: int
    model: str
    version: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> "TritonURL":
        if not url.startswith(SCHEME):
            raise ValueError(f"{url}: not a {SCHEME} URL")
        where, _, rest = url[len(SCHEME):].partition("/")
        host, _, port = where.rpartition(":")
        parts = [p for p in rest.split("/") if p]
        if not host or not port.isdigit() or not 1 <= len(parts) <= 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"{url}: expected {SCHEME}HOST:PORT/MODEL[/VERSION], e.g. {SCHEME}127.0.0.1:8001/recognizer")
        return cls(host, int(port), parts[0], parts[1] if len(parts) == 2 else "")


def _grpc():
    """``tritonclient.grpc`` and its exception type, or :class:`ModelLoadError` with :data:`INSTALL_HINT`."""
    grpcclient = require_module("tritonclient.grpc", ModelLoadError, INSTALL_HINT)
    from tritonclient.utils import InferenceServerException  # part of the package just imported

    return grpcclient, InferenceServerException


def _message(error: Exception) -> str:
    """The first line of a tritonclient error (its ``message()`` when it has one)."""
    text = error.message() if callable(getattr(error, "message", None)) else error
    return first_line(text) or type(error).__name__


def _dims(values) -> list:
    """Config dims as the Backend interface spells them: an int per fixed axis, None for a dynamic one."""
    return [None if int(d) < 0 else int(d) for d in values]


class TritonBackend(Backend):
    """A model served by Triton; ``run`` sends the batch over gRPC, split at the model's ``max_batch_size``."""

    name = "triton"

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S, **_ignored: Any):
        super().__init__(url)
        try:
            self.url = TritonURL.parse(url)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        self.timeout = float(timeout)
        self._grpc, self._error = _grpc()
        self._local = threading.local()
        self._clients: list = []
        self._clients_lock = threading.Lock()
        try:
            server_version = self._check_server()
            self.version = self._check_model()
            config = self._call("read the model config", lambda c: c.get_model_config(
                self.url.model, self.version, client_timeout=self.timeout)).config
            self._read_config(config)
        except ModelLoadError:
            self.close()
            raise
        # e.g. "Triton 2.51.0 at 127.0.0.1:8001 (model recognizer, version 1)"
        self._device = (f"Triton {server_version} at {self.url.address} "
                        f"(model {self.url.model}, version {self.version})")

    # ---------------------------------------------------------------------------------- connection

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._grpc.InferenceServerClient(url=self.url.address)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _call(self, what: str, fn):
        try:
            return fn(self._client())
        except self._error as e:
            raise ModelLoadError(f"{self.path}: cannot {what} ({_message(e)})") from None

    def _check_server(self) -> str:
        try:
            live = self._client().is_server_live(client_timeout=self.timeout)
        except self._error as e:
            raise ModelLoadError(f"{self.path}: no Triton server answers at {self.url.address} ({_message(e)})") from None
        if not live:
            raise ModelLoadError(f"{self.path}: the Triton server at {self.url.address} is not live")
        return self._call("read the server metadata",
                          lambda c: c.get_server_metadata(client_timeout=self.timeout)).version

    def _check_model(self) -> str:
        """The version to use (the asked one, else the newest ready one); raises when missing or not ready."""
        index = self._call("list the served models", lambda c: c.get_model_repository_index(
            client_timeout=self.timeout)).models
        entries = [m for m in index if m.name == self.url.model]
        if not entries:
            names = sorted({m.name for m in index})
            raise ModelLoadError(f"{self.path}: the server at {self.url.address} has no model "
                                 f"{self.url.model!r} (it has {names})")
        ready = sorted((m.version for m in entries if m.state == "READY" and m.version), key=int)
        version = self.url.version or (ready[-1] if ready else "")
        if not version or version not in ready:
            states = "; ".join(f"version {m.version or '?'}: {m.state or 'UNKNOWN'}"
                               + (f" ({first_line(m.reason)})" if m.reason.strip() else "")
                               for m in entries)
            wanted = f"version {version}" if version else "any version"
            raise ModelLoadError(f"{self.path}: model {self.url.model!r} is not ready ({wanted}; {states})")
        return version

    def _read_config(self, config) -> None:
        served = self.served = ServedModel.from_config(config, self.path)
        # the batch axis ("batch") comes first when the model batches (max_batch_size > 0)
        self._keep_metadata({k: v.string_value for k, v in config.parameters.items()})
        self._set_io(served.input, served.batch_axis() + served.input_dims, [name for name, _ in served.outputs],
                     [served.batch_axis() + dims for _, dims in served.outputs])

    # ---------------------------------------------------------------------------------- interface

    @property
    def fixed_batch(self) -> int | None:
        return None if self.served.max_batch_size > 0 else super().fixed_batch

    @property
    def max_batch(self) -> int | None:
        return self.served.max_batch_size if self.served.max_batch_size > 0 else super().max_batch

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self.served.input_dtype)
        step = self.served.max_batch_size
        if step <= 0 or len(x) <= step:
            return self._infer(x)
        parts = [self._infer(x[i:i + step]) for i in range(0, len(x), step)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.served.outputs))]

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        grpc, names = self._grpc, self.output_names
        inp = grpc.InferInput(self.served.input, list(x.shape), self.served.wire_datatype)
        inp.set_data_from_numpy(x)
        try:
            result = self._client().infer(self.url.model, [inp], model_version=self.version,
                                          outputs=[grpc.InferRequestedOutput(n) for n in names],
                                          client_timeout=self.timeout)
        except self._error as e:
            raise RuntimeError(f"{self.path}: inference failed ({_message(e)})") from None
        return [result.as_numpy(n) for n in names]

    def close(self) -> None:
        """Close every gRPC channel this backend opened."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()


@dataclass(frozen=True)
class ServedModel:
    """What a served model's config says: its one input (name, wire datatype, dims without the batch axis),
    its outputs (name, dims) and ``max_batch_size`` (0: the model does not batch; dims are whole shapes)."""

    input: str
    wire_datatype: str
    input_dims: list
    outputs: list[tuple[str, list]]
    max_batch_size: int

    @property
    def input_dtype(self) -> np.dtype:
        from tritonclient.utils import triton_to_np_dtype

        return np.dtype(triton_to_np_dtype(self.wire_datatype))

    def batch_axis(self) -> list:
        return ["batch"] if self.max_batch_size > 0 else []

    @classmethod
    def from_config(cls, config, source: str) -> "ServedModel":
        """Read a ``ModelConfig`` message; :class:`ModelLoadError` unless the model has exactly one input."""
        if len(config.input) != 1:
            raise ModelLoadError(f"{source}: expected a model with one input, it has {[i.name for i in config.input]}")
        inp = config.input[0]
        return cls(inp.name, _wire_datatype(inp.data_type), _dims(inp.dims),
                   [(o.name, _dims(o.dims)) for o in config.output], int(config.max_batch_size))


def _wire_datatype(config_type: int) -> str:
    """The inference-protocol datatype ("FP32", "BYTES", …) of a config ``DataType`` enum value."""
    from tritonclient.grpc import model_config_pb2

    name = model_config_pb2.DataType.Name(config_type)[len("TYPE_"):]
    return "BYTES" if name == "STRING" else name


def _available() -> bool:
    return importlib.util.find_spec("tritonclient") is not None


register(
    "triton",
    priority=0,  # only ever picked for triton:// URLs, which no other backend accepts
    available=_available,
    accepts=lambda p: str(p).startswith(SCHEME),
    factory=lambda p, **kw: TritonBackend(p, **kw),
    files=False,
)
