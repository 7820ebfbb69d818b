"""Launch a real Triton Inference Server on 127.0.0.1 over a model repository.

The `tritonserver` binary and its Python backend ship inside the `nvidia-pytriton` wheel, which
pins numpy < 2. The main environment runs numpy 2, so serving uses its own environment (the
"serve env", `make serve-setup` creates `.venv-serve`): the server binary, the backend stub and
the interpreter the stub runs our models in all come from there. The stub finds its packages
through the `python3` first on PATH, so that env's `bin/` goes first on the server's PATH.

The server runs in its own process group (one SIGKILL reaches it and every backend stub) and gets
SIGTERM when the process that started it dies (PR_SET_PDEATHSIG), so it never outlives us."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jambatrt.artifact import atomic_file
from jambatrt.deploy.repository import REPOSITORY_INFO, verify_repository
from jambatrt.errors import BackendUnavailable, JambaTRTError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
GUARD_SCRIPT = Path(__file__).with_name("guard.py")
UNREADY_PROBE_S = 2.0            # serve_forever probes readiness this often
UNREADY_LIMIT_S = 15.0           # and gives up on a server unready for this long
DEFAULT_SERVE_ENV = PACKAGE_ROOT / ".venv-serve"
SETUP_HINT = "run `make serve-setup` (creates .venv-serve with nvidia-pytriton and numpy<2)"
FAILED_MARKER = ".serve-setup-failed"     # written by `make serve-setup` with the reason it failed


# tritonserver flags only TritonServer sets (from its fields): where it listens and what it may load
OWN_FLAGS = {"--http-address", "--grpc-address", "--metrics-address", "--http-port", "--grpc-port",
             "--metrics-port", "--model-repository", "--model-store", "--backend-directory", "--allow-http",
             "--allow-grpc", "--allow-metrics", "--model-control-mode", "--load-model", "--sagemaker-port",
             "--vertex-ai-port", "--allow-sagemaker", "--allow-vertex-ai"}


class ServerError(JambaTRTError):
    """The server exited, did not become ready in time, or could not be started."""


class Interrupted(ServerError):
    """Ctrl-C / SIGTERM arrived while the server was starting."""

    exit_code = 130


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


BYTECODE_PTH = "jambatrt_serve_no_bytecode.pth"
BYTECODE_ENV = "JAMBATRT_NO_BYTECODE"


def prepare_serve_env(env: ServeEnv) -> Path:
    """Make the serve env runnable by tritonserver; idempotent, each file written atomically.

    - The wheel ships the Python backend without its stub: put the stub for the env's Python
      version next to libtriton_python.so (a half-copied binary would crash every model).
    - The stub's interpreter ignores PYTHON* variables, so PYTHONDONTWRITEBYTECODE cannot keep it
      from writing __pycache__ into the repository's model directories: a .pth file in the env
      sets sys.dont_write_bytecode when the server's environment has JAMBATRT_NO_BYTECODE=1, and
      serving then writes nothing into the repository."""
    stub = env.backend_dir / "python" / "triton_python_backend_stub"
    if not (stub.is_file() and os.access(stub, os.X_OK)):
        src = env.tritonserver_root / "python_backend_stubs" / env.python_version / "triton_python_backend_stub"
        if not src.is_file():
            have = sorted(p.name for p in (env.tritonserver_root / "python_backend_stubs").glob("*"))
            raise BackendUnavailable(f"no Python backend stub for Python {env.python_version} in nvidia-pytriton "
                                     f"(it has {', '.join(have) or 'none'})")
        _write_atomic(stub, src.read_bytes(), 0o755)
    pth = env.site_packages / BYTECODE_PTH
    line = f"import os, sys; sys.dont_write_bytecode |= os.environ.get({BYTECODE_ENV!r}) == '1'\n"
    if not pth.is_file() or pth.read_text() != line:
        _write_atomic(pth, line.encode(), 0o644)
    return stub


def _write_atomic(dest: Path, data: bytes, mode: int) -> None:
    with atomic_file(dest, mode) as tmp:
        tmp.write_bytes(data)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (all held open together while chosen, so no two are the
    same; another process may still take one before the server binds it -- start() then fails)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def _python_libdir(python: Path) -> str:
    # the stub links libpython3.X.so; the env's python knows where its shared library lives
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                         capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip()


def _death_signal():
    """A preexec_fn that asks Linux for SIGTERM when the process (strictly: the thread) that started
    the server dies; resolved here, in the parent, so the child only makes one libc call between
    fork and exec. None where prctl is unavailable."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)      # 1 = PR_SET_PDEATHSIG


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
    # seconds a stopping server waits for open requests and for its models to unload (Triton's default;
    # a Python-backend stub can take several seconds to finalize on a busy 2-core machine)
    exit_timeout: int = 30
    env_on_path: bool = True     # the serve env's python3 first on PATH (off: models carry EXECUTION_ENV_PATH)
    extra_env: dict = field(default_factory=dict)
    guard: bool = True           # the request guard (deploy/guard.py) on the public ports, tritonserver behind it
    proc: subprocess.Popen | None = field(default=None, init=False)
    guard_proc: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self):
        self.repository = Path(self.repository).absolute()
        given = {self.http_port, self.grpc_port, self.metrics_port}
        spare = iter([p for p in free_ports(8) if p not in given])      # distinct, and none of the given ones
        self.http_port = self.http_port or next(spare)
        self.grpc_port = self.grpc_port or next(spare)
        self.metrics_port = self.metrics_port or next(spare)
        # with the guard, tritonserver's HTTP and gRPC listen on private loopback ports only the guard uses
        self.triton_http_port = next(spare) if self.guard else self.http_port
        self.triton_grpc_port = next(spare) if self.guard else self.grpc_port
        # bind addresses and ports are this object's fields alone (127.0.0.1): no argument may move them
        bad = [a for a in self.extra_args if a.split("=")[0] in OWN_FLAGS]
        if bad:
            raise ServerError(f"extra server arguments {bad} would override the address/port flags jambatrt sets")
        if (self.repository / REPOSITORY_INFO).is_file():
            # a jambatrt repository: verified (its record included) before anything starts; nothing read
            # from it ever becomes a server flag (a bind address, a port)
            verify_repository(self.repository)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def model_names(self) -> list[str]:
        if self.models is not None:
            return list(self.models)
        return sorted(p.parent.name for p in self.repository.glob("*/config.pbtxt"))

    def command(self) -> list[str]:
        cmd = [str(self.env.binary), "--model-repository", str(self.repository),
               "--backend-directory", str(self.env.backend_dir),
               "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
               "--http-port", str(self.triton_http_port), "--grpc-port", str(self.triton_grpc_port),
               "--metrics-port", str(self.metrics_port), "--allow-gpu-metrics=false",
               "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout}",
               f"--log-verbose={self.verbose}"]
        if self.models is not None:
            cmd += ["--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models]]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}     # with the OpenMP wait settings `import jambatrt` set (threads.py)
        if self.env_on_path:
            env["PATH"] = f"{self.env.prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        libs = [d for d in (_python_libdir(self.env.python), str(self.env.libs_dir)) if d]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        if self.env_on_path:
            env["VIRTUAL_ENV"] = str(self.env.prefix)
        for k in ("PYTHONPATH", "PYTHONHOME"):      # the stub's interpreter is the serve env's, not ours
            env.pop(k, None)
        env[BYTECODE_ENV] = "1"                    # no __pycache__ inside the repository (prepare_serve_env)
        # kernels compiled by numba are cached outside the repository and the artifact
        env.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jambatrt-numba-cache"))
        return env

    def start(self, timeout: float = 180.0, interrupted=lambda: False) -> TritonServer:
        if self.proc is not None:
            raise ServerError("server already started")
        prepare_serve_env(self.env)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        specs = self._guard_specs() if self.guard else None     # refuse before starting anything
        log = open(self.log_path, "ab")     # noqa: SIM115 - handed to the child, closed right after
        try:
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_death_signal())   # noqa: PLW1509 - one libc call
        finally:
            log.close()
        try:
            if specs is not None:
                self._start_guard(specs)
            self.wait_ready(timeout, interrupted)
        except BaseException:
            self.stop()
            raise
        return self

    def _guard_specs(self) -> str:
        from jambatrt.deploy.guard import repository_specs, specs_to_json
        if not (self.repository / REPOSITORY_INFO).is_file():
            raise ServerError(f"{self.repository}: not written by `jambatrt deploy` (no {REPOSITORY_INFO}), so the "
                              "request guard has no limits for its models; serve it with guard=False")
        specs = repository_specs(self.repository)
        if self.models is not None:
            specs = {k: v for k, v in specs.items() if k in self.models}
        return specs_to_json(specs)

    def _start_guard(self, specs: str, timeout: float = 60.0) -> None:
        """The guard runs in the serve env's interpreter (it has grpcio), as a plain script: no
        jambatrt import, so it listens within a second. It prints 'ready' once both ports are bound."""
        log = open(self.log_path, "ab")     # noqa: SIM115 - handed to the child, closed right after
        try:
            self.guard_proc = subprocess.Popen(
                [str(self.env.python), str(GUARD_SCRIPT), "--http", self.http_url,
                 "--http-upstream", f"127.0.0.1:{self.triton_http_port}", "--grpc", self.grpc_url,
                 "--grpc-upstream", f"127.0.0.1:{self.triton_grpc_port}"],
                env=self.environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, preexec_fn=_death_signal(), text=True)   # noqa: PLW1509
        finally:
            log.close()
        self.guard_proc.stdin.write(specs + "\n")
        self.guard_proc.stdin.close()
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.guard_proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or line[0].strip() != "ready":
            raise ServerError(f"the request guard did not start (exit code {self.guard_proc.poll()}):\n"
                              f"{self.log_tail()}")

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def alive(self) -> bool:
        """tritonserver (and its guard) still running."""
        return (self.proc is not None and self.proc.poll() is None
                and (self.guard_proc is None or self.guard_proc.poll() is None))

    def exit_description(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            return f"tritonserver exited with code {self.proc.returncode}"
        if self.guard_proc is not None and self.guard_proc.poll() is not None:
            return f"the request guard exited with code {self.guard_proc.returncode}"
        return "running"

    def is_ready(self) -> bool:
        return self.alive() and self._get("/v2/health/ready") == 200

    def wait_ready(self, timeout: float = 180.0, interrupted=lambda: False) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if interrupted():
                raise Interrupted("interrupted before the server was ready")
            if not self.alive():
                raise ServerError(f"{self.exit_description()} before it was ready:\n{self.log_tail()}")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def last_log_line(self) -> str:
        """The log's last line that says something (not a stack frame of a crash dump)."""
        for line in reversed(self.log_tail(200).splitlines()):
            if line.strip() and not re.match(r"^\s*\d+# ", line):
                return line.strip()
        return "(empty)"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stub_pids(self) -> dict[int, str]:
        """The Python backend stubs of this server (pid -> model name): a stub that dies (a crash in a
        model, an abort in a custom op) leaves its model READY while it answers every request with
        "Stub process is not healthy", so serve_forever watches these."""
        out = {}
        if self.proc is None:
            return out
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != self.proc.pid:   # pgid
                    continue
                args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
            except (OSError, ValueError, IndexError):
                continue
            if args and args[0].endswith("triton_python_backend_stub"):
                model = next((Path(a).parent.parent.name for a in args if a.endswith("model.py")), "?")
                out[int(proc.name)] = model
        return out

    def _shm_regions(self) -> list[str]:
        """Shared-memory regions of this server's backend stubs (named on their command lines). A
        clean shutdown removes them; after SIGKILL nobody does, so kill() does."""
        names = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != self.proc.pid:   # pgid
                    continue
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            names += [a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region_")]
        return names

    def _kill_group(self) -> None:
        regions = self._shm_regions()
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if regions:
            time.sleep(0.2)      # the stubs die with the group; let them go before their regions
        for name in regions:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")

    def _stop_guard(self, sig: int = signal.SIGTERM) -> None:
        if self.guard_proc is not None and self.guard_proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.guard_proc.pid, sig)
            try:
                self.guard_proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.guard_proc.pid, signal.SIGKILL)
                self.guard_proc.wait(10)
        if self.guard_proc is not None and self.guard_proc.stdout:
            self.guard_proc.stdout.close()

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM the server (the guard first), which unloads its models and ends their backend stubs
        itself; SIGKILL to its whole process group after `timeout`, and to stubs left behind. (SIGTERM
        to the group killed the stubs under the server's feet: it then waited its exit timeout for
        models that could no longer unload and exited 1.)"""
        self._stop_guard()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
        self._kill_group()      # stubs left behind by a server that died abruptly (no-op after a clean exit)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once: no clean shutdown (what a crash looks like)."""
        self._stop_guard(signal.SIGKILL)
        if self.proc is not None:
            self._kill_group()

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")          # a zombie is dead, only not yet reaped


def serve_forever(server: TritonServer, out=sys.stdout) -> int:
    """Start, print the endpoints, block until Ctrl-C / SIGTERM (or the server exits), stop cleanly."""
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start(interrupted=lambda: stop["signal"] is not None)
        print(f"tritonserver ready (pid {server.proc.pid}), repository {server.repository}\n"
              f"  HTTP     http://{server.http_url}\n  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n  log      {server.log_path}", file=out)
        for name in server.model_names():
            if re.fullmatch(r".+_(stage[0-9]+|hop)", name):   # stages, the hop: reached through the ensemble only
                print(f"  {'hop' if name.endswith('_hop') else 'stage':8} {name} (inside the ensemble; the guard "
                      "refuses direct requests)", file=out)
                continue
            route = ("generate_stream  (decoupled: SSE, or gRPC streaming; text_input -> text_output, or "
                     "prompt_ids -> token_id)") if name.endswith("_generate") else "infer"
            print(f"  model    {name}: POST http://{server.http_url}/v2/models/{name}/{route}", file=out)
        print("Ctrl-C or SIGTERM stops it.", file=out, flush=True)
        # supervise: a dead server or guard, or a server that stays unready (a model's backend stub
        # died), ends the command at once with a non-zero exit and the reason, instead of a silent
        # endpoint; whoever runs `deploy --serve` (systemd, a job scheduler) restarts it
        last_ready = next_probe = time.monotonic()
        stubs = server.stub_pids()
        while stop["signal"] is None and server.alive():
            time.sleep(0.2)
            now = time.monotonic()
            if now >= next_probe:
                next_probe = now + UNREADY_PROBE_S
                gone = {pid: m for pid, m in stubs.items() if not _pid_alive(pid)}
                if gone and server.alive():
                    raise ServerError(f"the backend stub of {', '.join(sorted(set(gone.values())))} (pid "
                                      f"{', '.join(map(str, gone))}) died, so its model fails every request (log "
                                      f"{server.log_path}: {server.last_log_line()}): stopped the server")
                if server.is_ready():
                    last_ready = now
                elif now - last_ready > UNREADY_LIMIT_S and server.alive():
                    raise ServerError(f"tritonserver has not been ready for {UNREADY_LIMIT_S:.0f} s (a model failed; "
                                      f"log {server.log_path}: {server.last_log_line()}): stopped it")
        if not server.alive() and stop["signal"] is None:
            raise ServerError(f"{server.exit_description()} (log {server.log_path}: {server.last_log_line()})")
        code = server.stop()
        print(f"tritonserver stopped (exit code {code})", file=out, flush=True)
        return 0
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
