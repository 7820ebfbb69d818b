"""Launch a real Triton Inference Server on 127.0.0.1 over a model repository.

The `tritonserver` binary and its Python backend ship inside the `nvidia-pytriton` wheel, which
pins numpy < 2. The main environment runs numpy 2, so serving uses its own environment (the
"serve env", `make serve-setup` creates `.venv-serve`): the server binary, the backend stub and
the interpreter the stub runs our models in all come from there. The stub finds its packages
through the `python3` first on PATH, so that env's `bin/` goes first on the server's PATH.

The server runs in its own process group (one signal reaches it and every backend stub) and gets
SIGTERM when the process that started it dies (PR_SET_PDEATHSIG), so it never outlives us."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jambatrt.deploy.repository import REPOSITORY_INFO
from jambatrt.errors import BackendUnavailable, JambaTRTError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVE_ENV = PACKAGE_ROOT / ".venv-serve"
SETUP_HINT = "run `make serve-setup` (creates .venv-serve with nvidia-pytriton and numpy<2)"
FAILED_MARKER = ".serve-setup-failed"     # written by `make serve-setup` with the reason it failed


class ServerError(JambaTRTError):
    """The server exited, did not become ready in time, or could not be started."""


@dataclass(frozen=True)
class ServeEnv:
    """Where the serving pieces are: `prefix` (a venv or conda env), its python and site-packages,
    the tritonserver tree inside the nvidia-pytriton wheel."""

    prefix: Path
    python: Path
    site_packages: Path
    python_version: str          # "3.11"

    @property
    def tritonserver_root(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.tritonserver_root / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        return self.tritonserver_root / "backends"

    @property
    def libs_dir(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"


def find_serve_env(prefix: str | Path | None = None) -> ServeEnv:
    """The serve env: `prefix`, else $JAMBATRT_SERVE_ENV, else <package root>/.venv-serve.
    Raises BackendUnavailable (naming what to run) when it is missing or unusable."""
    prefix = Path(prefix or os.environ.get("JAMBATRT_SERVE_ENV") or DEFAULT_SERVE_ENV).absolute()
    failed = prefix / FAILED_MARKER
    if failed.is_file():
        raise BackendUnavailable(f"the serve env {prefix} could not be created: {failed.read_text().strip()}")
    python = prefix / "bin" / "python3"
    if not python.exists():
        raise BackendUnavailable(f"no serve env at {prefix} ({SETUP_HINT}, or point JAMBATRT_SERVE_ENV at a "
                                 "venv with nvidia-pytriton, numpy<2 and jambatrt installed)")
    sites = sorted(prefix.glob("lib/python3.*/site-packages"))
    if len(sites) != 1:
        raise BackendUnavailable(f"{prefix}: expected one lib/python3.X/site-packages, found {len(sites)}")
    site = sites[0]
    env = ServeEnv(prefix, python, site, site.parent.name.removeprefix("python"))
    if not env.binary.is_file():
        raise BackendUnavailable(f"{prefix}: no tritonserver binary at {env.binary} (pip install nvidia-pytriton "
                                 f"into it; {SETUP_HINT})")
    numpy = [p.name for p in site.glob("numpy-*.dist-info")]
    if not numpy:
        raise BackendUnavailable(f"{prefix}: numpy is not installed there ({SETUP_HINT})")
    version = numpy[0].removeprefix("numpy-").removesuffix(".dist-info")
    if int(version.split(".")[0]) >= 2:
        # NOTES-ENV: with numpy >= 2 the Python backend reports READY and then fails every response
        raise BackendUnavailable(f"{prefix}: numpy {version} there; the Python backend stub needs numpy < 2 "
                                 f"({SETUP_HINT})")
    if not (list(site.glob("jambatrt-*.dist-info")) or list(site.glob("__editable__*jambatrt*"))):
        raise BackendUnavailable(f"{prefix}: jambatrt is not installed there (pip install -e <repo> --no-deps; "
                                 f"{SETUP_HINT})")
    return env


def ensure_python_stub(env: ServeEnv) -> Path:
    """The wheel ships the Python backend without its stub; put the stub for the env's Python
    version next to libtriton_python.so (atomically: a half-copied binary would crash every model)."""
    dest = env.backend_dir / "python" / "triton_python_backend_stub"
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    src = env.tritonserver_root / "python_backend_stubs" / env.python_version / "triton_python_backend_stub"
    if not src.is_file():
        have = sorted(p.name for p in (env.tritonserver_root / "python_backend_stubs").glob("*"))
        raise BackendUnavailable(f"no Python backend stub for Python {env.python_version} in nvidia-pytriton "
                                 f"(it has {', '.join(have) or 'none'})")
    fd, tmp = tempfile.mkstemp(prefix=".stub.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_libdir(python: Path) -> str:
    # the stub links libpython3.X.so; the env's python knows where its shared library lives
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def _die_with_parent():
    # runs in the child between fork and exec: SIGTERM when the parent dies (Linux only)
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG


@dataclass
class TritonServer:
    """One tritonserver process bound to 127.0.0.1. Use as a context manager, or start()/stop().

    `models`: load only these (explicit model control), else every model in the repository."""

    repository: Path
    env: ServeEnv
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    models: list[str] | None = None
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    verbose: int = 0
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self):
        self.repository = Path(self.repository).absolute()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if self.extra_args == [] and (self.repository / REPOSITORY_INFO).is_file():
            info = json.loads((self.repository / REPOSITORY_INFO).read_text())
            self.extra_args = list(info.get("server_args", []))

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [str(self.env.binary), "--model-repository", str(self.repository),
               "--backend-directory", str(self.env.backend_dir),
               "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--allow-gpu-metrics=false",
               "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.verbose}"]
        if self.models is not None:
            cmd += ["--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models]]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.env.prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        libs = [d for d in (_python_libdir(self.env.python), str(self.env.libs_dir)) if d]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env["VIRTUAL_ENV"] = str(self.env.prefix)
        for k in ("PYTHONPATH", "PYTHONHOME"):      # the stub's interpreter is the serve env's, not ours
            env.pop(k, None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"       # no __pycache__ inside the repository's model dirs
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # kernels compiled by numba are cached outside the repository and the artifact
        env.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jambatrt-numba-cache"))
        return env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if self.proc is not None:
            raise ServerError("server already started")
        ensure_python_stub(self.env)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def is_ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._get("/v2/health/ready") == 200

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} before it was ready:\n"
                                  f"{self.log_tail()}")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's process group (server + backend stubs), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self._signal_group(signal.SIGKILL)     # stubs left behind by a server that died abruptly
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once: no clean shutdown (what a crash looks like)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


def serve_forever(server: TritonServer, out=sys.stdout) -> int:
    """Start, print the endpoints, block until Ctrl-C / SIGTERM (or the server exits), stop cleanly."""
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(f"tritonserver ready (pid {server.proc.pid}), repository {server.repository}\n"
              f"  HTTP     http://{server.http_url}\n  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n  log      {server.log_path}\n"
              "Ctrl-C or SIGTERM stops it.", file=out, flush=True)
        while stop["signal"] is None and server.proc.poll() is None:
            time.sleep(0.2)
        if server.proc.poll() is not None and stop["signal"] is None:
            raise ServerError(f"tritonserver exited with code {server.proc.returncode}:\n{server.log_tail()}")
        code = server.stop()
        print(f"tritonserver stopped (exit code {code})", file=out, flush=True)
        return 0
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
