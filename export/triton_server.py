"""Serve a model repository on a local Triton server (tests, benchmarks, trying an export on this machine).

The server binary: ``$FACEKIT_TRITONSERVER`` (a ``tritonserver`` inside a Triton install, e.g.
``/opt/tritonserver/bin/tritonserver``), else the one bundled in the ``nvidia-pytriton`` wheel (Triton 2.51
with the Python backend only; CPU is enough), else ``tritonserver`` on PATH. It listens on 127.0.0.1 only, on
free ports. The Python backend's stub runs this interpreter's ``python3`` (put first on PATH: a venv's
``pyvenv.cfg`` is honoured) against its shared libpython (on ``LD_LIBRARY_PATH``; without it the stub fails
with an ``RLock`` error), and this facekit checkout goes first on ``PYTHONPATH``. The server runs in its own
process group, which :meth:`LocalTritonServer.stop` kills (stubs included).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from runtime.ports import free_port

ENV_BINARY = "FACEKIT_TRITONSERVER"
INSTALL_HINT = (f"no tritonserver found: pip install --no-deps nvidia-pytriton (bundles Triton 2.51 with the "
                f"Python backend), or set {ENV_BINARY} to a tritonserver binary")
STUB = "triton_python_backend_stub"


class TritonServerMissing(RuntimeError):
    """No usable ``tritonserver`` (or no Python-backend stub for this interpreter) on this machine."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a Triton server's pieces are: the binary, the Python backend, its stub, extra library folders."""

    binary: Path
    python_backend: Path  # holds libtriton_python.so and triton_python_backend_utils.py
    stub: Path
    library_dirs: tuple[Path, ...] = ()

    @classmethod
    def from_binary(cls, binary: str | os.PathLike) -> "TritonInstall":
        """A Triton install laid out as NVIDIA ships it: ``<root>/bin/tritonserver``, ``<root>/backends/python``."""
        binary = Path(binary).resolve()
        backend = binary.parent.parent / "backends" / "python"
        if not binary.is_file() or not (backend / STUB).is_file():
            raise TritonServerMissing(f"{binary}: not a tritonserver with a Python backend ({backend / STUB} missing)")
        return cls(binary, backend, backend / STUB)


def _pytriton_install() -> TritonInstall | None:
    """The server bundled in the nvidia-pytriton wheel, found without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / STUB
    if not (root / "bin" / "tritonserver").is_file():
        return None
    if not stub.is_file():
        raise TritonServerMissing(f"{root}: the bundled Triton has no Python-backend stub for Python {version}")
    return TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python", stub,
                         (root.parent.parent / "nvidia_pytriton.libs",))


def find_tritonserver() -> TritonInstall:
    """The Triton server to run (see the module docstring for the order); :class:`TritonServerMissing` if none."""
    if os.environ.get(ENV_BINARY):
        return TritonInstall.from_binary(os.environ[ENV_BINARY])
    bundled = _pytriton_install()
    if bundled is not None:
        return bundled
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall.from_binary(on_path)
    raise TritonServerMissing(INSTALL_HINT)


def facekit_root() -> Path:
    """The folder holding the imported ``runtime`` package (this checkout or the installed facekit)."""
    import runtime

    return Path(runtime.__file__).resolve().parent.parent


def server_environment(install: TritonInstall) -> dict[str, str]:
    """The environment for ``tritonserver``: this interpreter first on PATH, libpython and the install's
    libraries on LD_LIBRARY_PATH, this facekit first on PYTHONPATH."""
    env = dict(os.environ)

    def prepend(key: str, *entries: str | os.PathLike) -> None:
        old = [p for p in env.get(key, "").split(os.pathsep) if p]
        env[key] = os.pathsep.join([str(e) for e in entries] + old)

    prepend("PATH", os.path.dirname(sys.executable))
    prepend("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR") or "", *install.library_dirs)
    prepend("PYTHONPATH", facekit_root())
    return env


class LocalTritonServer:
    """``tritonserver`` over ``repository`` on 127.0.0.1 (free HTTP, gRPC and metrics ports); a context manager.

    ``start`` waits (at most ``startup_timeout`` s) until the server reports ready, i.e. every model loaded,
    and raises with the log's tail if it exits or times out first.
    """

    def __init__(self, repository: str | os.PathLike, install: TritonInstall | None = None,
                 startup_timeout: float = 180.0, log_path: str | os.PathLike | None = None):
        self.repository = Path(repository).resolve()
        self.install = install or find_tritonserver()
        self.startup_timeout = float(startup_timeout)
        self._workdir = Path(tempfile.mkdtemp(prefix="facekit-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def url(self, model: str) -> str:
        """The runtime's address of a served model: ``triton://127.0.0.1:PORT/MODEL``."""
        return f"triton://{self.grpc_address}/{model}"

    def _backend_directory(self) -> Path:
        """A backends folder whose ``python/`` links the install's Python backend and the matching stub."""
        folder = self._workdir / "backends" / "python"
        folder.mkdir(parents=True, exist_ok=True)
        for item in self.install.python_backend.iterdir():
            if item.name != STUB and not (folder / item.name).exists():
                (folder / item.name).symlink_to(item)
        if not (folder / STUB).exists():
            (folder / STUB).symlink_to(self.install.stub)  # a link keeps the stub's $ORIGIN library lookup
        return folder.parent

    def start(self) -> "LocalTritonServer":
        backends = self._backend_directory()
        for attempt in range(3):  # a free port can be taken between choosing it and the server binding it
            self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
            cmd = [str(self.install.binary), f"--model-repository={self.repository}",
                   f"--backend-directory={backends}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                   "--metrics-address=127.0.0.1", f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                   f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
                   "--pinned-memory-pool-byte-size=0", "--log-verbose=0"]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self._workdir,
                                             env=server_environment(self.install), start_new_session=True)
            if self._wait_ready():
                return self
            tail = self.log_tail()
            self.stop(remove_workdir=False)
            if "address already in use" not in self.log_tail(400).lower() or attempt == 2:
                break
        self.stop()
        raise RuntimeError(f"tritonserver did not become ready over {self.repository}; log tail:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, remove_workdir: bool = True) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after 15 s)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:  # stubs left in the group after the server exited
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if remove_workdir:  # the log goes with it unless log_path put it elsewhere
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def executed_batches(grpc_address: str, model: str, timeout: float = 30.0) -> dict[int, int]:
    """Batch size → number of executions of ``model`` so far, from Triton's statistics endpoint."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=grpc_address)
    try:
        stats = client.get_inference_statistics(model, client_timeout=timeout)
    finally:
        client.close()
    out: dict[int, int] = {}
    for model_stats in stats.model_stats:
        for b in model_stats.batch_stats:
            out[int(b.batch_size)] = out.get(int(b.batch_size), 0) + int(b.compute_infer.count)
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    """``python export/triton_server.py REPOSITORY``: serve it on 127.0.0.1 until interrupted."""
    import argparse

    p = argparse.ArgumentParser(description="Serve a model repository on a local Triton server (127.0.0.1, "
                                            "free ports) until Ctrl-C.")
    p.add_argument("repository", type=Path)
    args = p.parse_args(argv)
    try:
        server = LocalTritonServer(args.repository).start()
    except (TritonServerMissing, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(f"serving {args.repository}: gRPC {server.grpc_address} (e.g. {server.url('recognizer')}), "
              f"HTTP 127.0.0.1:{server.http_port}, metrics http://127.0.0.1:{server.metrics_port}/metrics; "
              f"log {server.log_path}", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        print(f"error: tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
