"""The `jambatrt` command. Thin: parse, call a stage, print. Typed errors become one message and
an exit code, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console

from jambatrt.errors import JambaTRTError

console = Console(stderr=True)


# ---- option values: every numeric option is parsed by one of these, with its range (issue 15) ----------
# Ranges are what the stages can honour: counts >= 1, seeds and ids that fit int64, lengths and token
# budgets under 2^31 (TensorRT's int32 volumes; far above any context here), finite times and
# probabilities. A value outside is refused by the parser, before any stage runs.
INT64_MAX = 2 ** 63 - 1
TOKENS_MAX = 2 ** 31 - 1
SECONDS_MAX = 365 * 24 * 3600.0


def _int_option(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} (accepted: an integer in [{lo:,}, {hi:,}])") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} (accepted: an integer in [{lo:,}, {hi:,}])")
        return v
    parse.__name__ = "integer"
    parse.range = (lo, hi)          # read by the tests: every numeric option has one
    return parse


def _float_option(lo: float, hi: float, lo_open: bool = False):
    bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} (accepted: a number in {bounds})") from None
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"{text} (accepted: a finite number in {bounds})")
        return v
    parse.__name__ = "number"
    parse.range = (lo, hi)
    return parse


def _int_list(lo: int, hi: int, example: str):
    one = _int_option(lo, hi)

    def parse(text: str) -> list[int]:
        parts = [v.strip() for v in text.split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. {example}")
        try:
            return [one(v) for v in parts]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    parse.__name__ = "list"
    parse.range = (lo, hi)
    return parse


COUNT = _int_option(1, TOKENS_MAX)               # batch, repeats, instances, sequences, jobs, ...
TOKENS = _int_option(1, TOKENS_MAX)              # lengths, contexts, chunks, token budgets
SEED = _int_option(0, INT64_MAX)
TOKEN_ID = _int_option(0, INT64_MAX)             # the engine checks it against the vocabulary
PORT = _int_option(0, 65535)                     # 0: any free port
SECONDS = _float_option(0.0, SECONDS_MAX, lo_open=True)
_lengths = _int_list(1, TOKENS_MAX, "1,17,4096")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one `error: UsageError: ...` line (exit 2), like every other error."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        # argparse hands `--opt=--` over as [] without calling the option's type: refuse it here
        for act in self._actions:
            if hasattr(act.type, "range") and getattr(ns, act.dest, None) == []:
                self.error(f"argument {'/'.join(act.option_strings)}: expected a value")
        return ns, extras

    def error(self, message: str):
        from jambatrt.errors import UsageError
        print(f"error: {UsageError.__name__}: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(UsageError.exit_code)


class _progress_bytes:
    """rich progress for a stage: one line for the current step, one bar for bytes written or read
    (tensors/bytes done, rate, ETA)."""

    def __enter__(self):
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        from rich.text import Text

        def bytes_only(column):     # the step line has no byte count: show nothing there, not "0/? bytes"
            class Column(column):
                def render(self, task):
                    return super().render(task) if task.total is not None else Text("")
            return Column()

        self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          bytes_only(DownloadColumn), bytes_only(TransferSpeedColumn),
                          bytes_only(TimeRemainingColumn), console=console, transient=False)
        self.p.__enter__()
        self.task = self.p.add_task("starting", total=None)
        self.bytes_task = None
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def step(self, msg: str) -> None:
        self.p.update(self.task, description=msg)

    def start_bytes(self, what: str, total: int, tensors: int = 0) -> None:
        self.what, self.tensors, self.done = what, tensors, 0
        self.bytes_task = self.p.add_task(self._label(), total=total)

    def _label(self) -> str:
        return f"{self.what} ({self.done:,}/{self.tensors:,} tensors)" if self.tensors else self.what

    def advance(self, n: int) -> None:
        if self.bytes_task is not None:
            self.p.update(self.bytes_task, advance=n)

    def tensor_done(self) -> None:
        self.done += 1
        if self.bytes_task is not None:
            self.p.update(self.bytes_task, description=self._label())


def _progress():
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


# ---- export ----------------------------------------------------------------------------------
def cmd_export(a) -> int:
    from jambatrt.artifact import atomic_dir, record_files
    from jambatrt.config import PRESETS
    from jambatrt.errors import ConfigError
    from jambatrt.export.checkpoint import dtype_from_name
    from jambatrt.export.run import export_stage

    if (a.checkpoint is None) == (a.preset is None):
        raise ConfigError("give exactly one of CHECKPOINT_DIR or --preset NAME "
                          f"(presets: {', '.join(sorted(PRESETS))})")
    if a.preset is not None and a.preset not in PRESETS:
        raise ConfigError(f"unknown preset {a.preset!r} (accepted: {', '.join(sorted(PRESETS))})")
    if a.checkpoint is not None:
        try:
            Path(a.checkpoint).resolve()
        except RuntimeError as e:            # Python < 3.13 reports a symlink loop as RuntimeError
            from jambatrt.errors import CheckpointError
            raise CheckpointError(f"{a.checkpoint}: cannot be read ({e})") from None
    dtype = dtype_from_name(a.dtype)
    # the config alone says whether this machine can export it: refuse before a tensor is listed
    from jambatrt.config import JambaConfig, preset
    from jambatrt.export.plan import refuse_unbuildable
    cfg = preset(a.preset) if a.preset is not None else JambaConfig.load(a.checkpoint)
    refuse_unbuildable(cfg, dtype.itemsize, a.experts_int8, out_dir=a.out,
                       source=f"preset {a.preset}" if a.preset else f"{a.checkpoint}/config.json")
    with atomic_dir(a.out, force=a.force) as tmp, _progress_bytes() as prog:     # a refused OUT before any output
        manifest, known = export_stage(tmp, checkpoint=a.checkpoint, preset_name=a.preset, dtype=dtype,
                                       experts_int8=a.experts_int8, seed=a.seed, max_seq=a.max_seq, progress=prog,
                                       weights_int8=a.weights_int8)
        prog.step("manifest (sha256 of every file)")
        record_files(tmp, manifest, [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*"))
                                     if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"],
                     known=known)
        prog.step("export done")
    print(f"exported {a.preset or a.checkpoint} -> {a.out}")
    return 0


# ---- build / validate ------------------------------------------------------------------------
def cmd_build(a) -> int:
    from jambatrt.engines import engine_class
    from jambatrt.errors import InputError

    for flag, value in (("--prefill-compute", a.prefill_compute), ("--kv-cache", a.kv_cache), ("--decode", a.decode)):
        if value is not None and (a.backend != "ort" or a.stages is not None or a.stage_plan is not None):
            raise InputError(f"{flag} is a setting of the single ONNX Runtime engine (build --backend ort, "
                             "without --stages)")
    if a.stages is not None or a.stage_plan is not None:
        return _build_stages(a)
    cls = engine_class(a.backend)
    with console.status(f"building the {a.backend} engine for {a.out}"):
        settings = ({"attention": a.attention, "prefill_compute": a.prefill_compute, "kv_cache": a.kv_cache,
                     "decode": a.decode}
                    if a.backend == "ort" else
                    {"max_batch": a.max_batch, "max_seq": a.max_seq, "prefill_chunk": a.prefill_chunk})
        if a.backend == "tensorrt":
            settings["moe"] = a.moe
        entry = cls.build(a.out, **settings)
    print(f"built {a.backend} engine: {Path(a.out) / entry['path']}")
    return 0


def _gpu_bytes(a):
    from jambatrt.export.stage_plan import parse_bytes
    return None if a.gpu_memory is None else parse_bytes(a.gpu_memory)


def _build_stages(a) -> int:
    """build --stages N | --stage-plan auto --gpu-memory SIZE: pipeline-stage engines (engines/staged.py)."""
    from jambatrt.errors import UsageError
    from jambatrt.export.stage_plan import describe
    if a.stages is not None and a.stage_plan is not None:
        raise UsageError("give --stages N or --stage-plan auto, not both")
    if a.stage_plan is not None and a.gpu_memory is None:
        raise UsageError("--stage-plan auto needs --gpu-memory (e.g. 80GB): the plan picks the fewest stages that fit it")
    if a.backend == "tensorrt":
        raise UsageError("--stages with --backend tensorrt: stage engines are built for ort and aoti here "
                         "(TensorRT stages need the TensorRT toolchain and a GPU; see docs/multinode.md)")
    from jambatrt.engines.staged import build_stages
    with console.status(f"building pipeline-stage {a.backend} engines for {a.out}"):
        entry = build_stages(a.out, stages=a.stages, gpu_bytes=_gpu_bytes(a), attention=a.attention,
                             backend=a.backend)
    for line in describe(entry["plan"]):
        print(f"  {line}")
    print(f"built {len(entry['stages'])} {a.backend} stage engines: "
          + ", ".join(str(Path(a.out) / s["path"]) for s in entry["stages"]))
    return 0


def cmd_validate(a) -> int:
    from jambatrt.engines import engine_class
    from jambatrt.validate.parity import run_parity
    from jambatrt.validate.reference import make_reference
    from jambatrt.validate.report import check_report_paths, parity_plot_paths, parity_report_paths, write_parity
    from jambatrt.errors import InputError

    path = Path(a.report) if a.report else Path(a.out) / "reports" / f"parity-{a.backend}-{a.reference}.json"
    check_report_paths(parity_report_paths(path), "--report")      # before the run, not after it
    engine = engine_class(a.backend).load(a.out)
    _check_run_size(engine, a.lengths, a.batch, "validate", copies=PARITY_BYTES_PER_LOGIT)
    kv_cache = getattr(engine, "kv_cache", "float32")
    if kv_cache != "float32" and a.reference != "eager":
        raise InputError(f"this {a.backend} engine keeps an {kv_cache} KV cache; --reference {a.reference} attends over "
                         "float keys and values (accepted: --reference eager, which rounds them as the cache does)")
    reference = make_reference(a.reference, a.out, **({"kv_cache": kv_cache} if kv_cache != "float32" else {}))
    with _progress() as prog:
        task = prog.add_task("parity", total=len(a.lengths))

        def on_length(i, L):
            prog.update(task, completed=i, description=f"length {L:,} ({a.backend} vs {a.reference})")

        report = run_parity(engine, reference, a.lengths, engine.compute_dtype, batch=a.batch, seed=a.seed,
                            on_length=on_length, check_state=not a.no_state)
        prog.update(task, completed=len(a.lengths), description="parity done")
    json_path, md_path = write_parity(report.to_dict(), path, engine.manifest.raw)
    for r in report.results:
        worst = max((s.get("max_abs_err", 0.0) for s in r.states.values()), default=None)
        print(f"  length {r.length:>7,}: max|diff| {r.max_abs_err:.2e}  mean {r.mean_abs_err:.2e}  "
              f"top-1 {r.top1_agreement:.4f}  "
              + (f"({r.argmax_ties['flipped']} of {r.argmax_ties['tied_positions']} argmax ties flipped)  "
                 if r.argmax_ties.get("flipped") else "")
              + ("" if worst is None else f"states {worst:.2e}  ")
              + f"engine {r.seconds['engine']:.3f}s  reference {r.seconds['reference']:.3f}s  "
              f"{'ok' if r.passed else 'FAIL'}")
        if r.health.get("problem"):
            first = r.health["first_bad_layer"]
            print(f"      health: {'first bad layer ' + str(first) + ': ' if first is not None else ''}"
                  f"{r.health['problem']}")
    print(f"report: {json_path} (summary: {md_path}; plots: {', '.join(map(str, parity_plot_paths(json_path)))})")
    if not report.passed:
        from jambatrt.errors import ParityError
        raise ParityError(report.mismatches)
    print(f"parity passed: {a.backend} vs {a.reference} at lengths {', '.join(map(str, a.lengths))}")
    return 0


# Bytes held per logit (per token and vocabulary entry) at the peak of one length: validate keeps the
# engine's and the reference's fp32 logits and compares them in float64 (both copies, |diff|, the
# bound); profile's child holds the engine's fp32 logits and its reference's.
PARITY_BYTES_PER_LOGIT = 2 * 4 + 4 * 8
PROFILE_BYTES_PER_LOGIT = 2 * 4


def _check_run_size(engine, lengths: list[int], batch: int, command: str, copies: int) -> None:
    """Refuse, before anything is allocated, a length beyond the engine's context and a batch x
    length whose logits alone cannot fit this machine's memory (they scale with the vocabulary)."""
    from jambatrt.errors import InputError
    too_long = [n for n in lengths if n > engine.max_seq]
    if too_long:
        raise InputError(f"{command}: length {max(too_long):,} exceeds the engine's maximum context "
                         f"{engine.max_seq:,} (lengths, plus decode tokens for profile)")
    need = batch * max(lengths) * engine.config.vocab_size * copies
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > have:
        raise InputError(f"{command}: batch {batch} x {max(lengths):,} tokens needs about {need / 1e9:,.1f} GB for the "
                         f"logits alone (vocab {engine.config.vocab_size:,}); this machine has {have / 1e9:,.1f} GB: "
                         "use a smaller --batch or shorter --lengths")


# ---- profile ---------------------------------------------------------------------------------
def cmd_profile(a) -> int:
    from jambatrt.artifact import read_manifest
    from jambatrt.engines import engine_class
    from jambatrt.validate.profile import run_profile
    from jambatrt.validate.report import check_report_paths, profile_report_paths, write_profile

    path = Path(a.report) if a.report else Path(a.out) / "reports" / f"profile-{a.backend}.json"
    check_report_paths(profile_report_paths(path, a.plot), "--report/--plot")   # before the run, not after it
    with engine_class(a.backend).load(a.out) as engine:     # fail here, typed, before any child starts
        _check_run_size(engine, [max(a.lengths) + a.decode_tokens, a.warmup_tokens], a.batch, "profile",
                        copies=PROFILE_BYTES_PER_LOGIT)
    modes = tuple(m for m in a.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in ("prefill", "decode")]
    if bad or not modes:
        from jambatrt.errors import InputError
        raise InputError(f"--modes {a.modes!r} (accepted: prefill, decode, or prefill,decode)")
    with _progress() as prog:
        task = prog.add_task("profile", total=None)
        report = run_profile(a.out, a.backend, a.lengths, reference=a.reference, modes=modes, repeats=a.repeats,
                             warmup_tokens=a.warmup_tokens, budget_s=a.budget_s, decode_tokens=a.decode_tokens,
                             batch=a.batch, reference_max_length=a.reference_max_length, timeout_s=a.timeout,
                             on_step=lambda msg: prog.update(task, description=msg))
        prog.update(task, description="profile done", total=1, completed=1)
    json_path, md_path, png = write_profile(report, path, read_manifest(a.out), plot=a.plot)

    def tps(v):
        return "—" if v is None else f"{v:,.1f}"
    for r in report["results"]:
        print(f"  length {r['length']:>7,} {r['mode']:<7}: {tps(r['tokens_per_s']):>10} tok/s "
              f"(min {tps(r['tokens_per_s_min'])}, max {tps(r['tokens_per_s_max'])}, {r['runs']} runs)  "
              f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB  reference {tps(r['reference_tokens_per_s'])} tok/s"
              + (f", {r['reference_peak_rss_bytes'] / 1e9:.2f} GB" if r.get("reference_peak_rss_bytes") else ""))
    print(f"report: {json_path} (summary: {md_path}; plot: {png})")
    return 0


# ---- generate --------------------------------------------------------------------------------
def cmd_generate(a) -> int:
    from jambatrt.engines import engine_class
    from jambatrt.engines.generate import Sampling, generate
    from jambatrt.errors import UsageError

    given = [o for o, v in (("--prompt-ids", a.prompt_ids), ("--prompt", a.prompt), ("--chat", a.chat),
                            ("--chat-file", a.chat_file)) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --prompt TEXT, --chat MESSAGE, --chat-file FILE or --prompt-ids IDS"
                         + (f" (got {', '.join(given)})" if given else ""))
    if a.stages:
        from jambatrt.engines.staged import staged_engine_class
        engine = staged_engine_class(a.backend).load(a.out)     # the stage engines of `build --stages`, in order
    else:
        engine = engine_class(a.backend).load(a.out)
    codec = None
    if a.prompt_ids is not None:
        prompts, eos = a.prompt_ids, a.eos_id
    else:
        from jambatrt.text import TextCodec, read_messages
        codec = TextCodec(a.out, engine.manifest.text)
        if a.prompt is not None:
            prompts = [codec.encode(a.prompt)]
        else:
            messages = read_messages(a.chat_file) if a.chat_file else [{"role": "user", "content": a.chat}]
            prompts = [codec.encode_chat(messages)]
        # text mode stops where the model's generation config says (several ids for Jamba-1.5)
        eos = [a.eos_id] if a.eos_id is not None else codec.eos_token_ids
    stream = not a.json
    pieces = codec.stream() if codec else None

    def on_token(i, tok):
        if not stream:
            return
        if pieces is not None:
            print(pieces.step(tok), end="", flush=True)
        else:
            print(f"{tok}" if len(prompts) == 1 else f"[{i}] {tok}", end=" " if len(prompts) == 1 else "\n", flush=True)

    gens, stats = generate(engine, prompts, a.max_new_tokens, Sampling(a.temperature, a.top_p, a.seed),
                           eos_id=eos, on_token=on_token)
    if pieces is not None and stream:
        print(pieces.finish(), end="")
    if a.json:
        out = [{"prompt_ids": g.prompt_ids, "generated_ids": g.generated_ids, "tokens_per_s": stats["tokens_per_s"]}
               | ({"text": codec.decode(g.generated_ids)} if codec else {}) for g in gens]
        print(json.dumps(out[0] if len(out) == 1 else out))
    else:
        print()
        console.print(f"{stats['new_tokens']} tokens in {stats['total_seconds']:.3f} s "
                      f"({stats['tokens_per_s']:.1f} tok/s, prefill {stats['prefill_seconds']:.3f} s)")
    return 0


def _prompts(text: str) -> list[list[int]]:
    """--prompt-ids: prompts separated by ';', each comma-separated token ids (each must fit int64;
    the engine checks them against the vocabulary)."""
    ids = _int_list(0, INT64_MAX, "1,2,3")
    prompts = text.split(";")
    if any(not p.replace(",", "").strip() for p in prompts):
        raise argparse.ArgumentTypeError(f"{text!r}: empty prompt (give at least one token id per prompt, e.g. 1,2,3)")
    return [ids(p) for p in prompts]


_prompts.range = (0, INT64_MAX)


# ---- deploy ----------------------------------------------------------------------------------
def cmd_deploy(a) -> int:
    from jambatrt.deploy.repository import RepositorySettings, write_repository

    settings = RepositorySettings(name=a.name, max_tokens=a.max_tokens, max_sequences=a.max_sequences,
                                  idle_seconds=a.idle_seconds, instances=a.instances, stages=a.stages,
                                  stage_devices=a.stage_devices, stage_backend=a.stage_backend, nodes=a.nodes, node=a.node, next_node=a.next_node,
                                  hop_timeout=a.hop_timeout,
                                  execution_env=str(Path(a.execution_env).absolute()) if a.execution_env else None)
    info = write_repository(a.out, a.repository, settings, force=a.force)
    verb = "kept (already up to date)" if info["reused"] else "wrote"
    print(f"{verb} Triton model repository {Path(a.repository).absolute()}: {', '.join(info['models'])} "
          f"(artifact {info['artifact']})")
    if not a.serve:
        return 0
    from jambatrt.deploy.server import TritonServer, find_serve_env, serve_forever

    models = list(info["models"])
    from jambatrt.manifest import Manifest
    aoti_device = Manifest.read(a.out).engines.get("aoti", {}).get("device")
    gpu_kinds = {"tensorrt"} | ({"aoti"} if aoti_device == "cuda" else set())
    if a.stages and a.stage_devices == "gpu" and not Path("/dev/nvidiactl").exists():
        from jambatrt.errors import UsageError
        raise UsageError("--stage-devices gpu pins stage k to GPU k, and this machine has no GPU: serve with "
                         "--stage-devices cpu (the repository is written)")
    if not Path("/dev/nvidiactl").exists() and any(k in gpu_kinds for k in info["models"].values()):
        models = [m for m, k in info["models"].items() if k not in gpu_kinds]
        console.print("no GPU here: serving without the TensorRT / CUDA AOTInductor models")
    server = TritonServer(a.repository, find_serve_env(a.serve_env), http_port=a.http_port, grpc_port=a.grpc_port,
                          metrics_port=a.metrics_port, models=models)
    console.print("starting tritonserver on 127.0.0.1 ...")
    return serve_forever(server)


# ---- inspect ---------------------------------------------------------------------------------
def cmd_inspect(a) -> int:
    from jambatrt.config import JambaConfig, preset
    from jambatrt.errors import ConfigError
    from jambatrt.export.plan import memory_plan

    if (a.out is None) == (a.preset is None):
        raise ConfigError("give exactly one of OUT or --preset NAME")
    if a.preset is not None:
        cfg = preset(a.preset)
    else:
        from jambatrt.manifest import Manifest
        cfg = Manifest.read(a.out).config
    plan = memory_plan(cfg, context=a.context, batch=a.batch)
    from jambatrt.engines.tensorrt import build_host_memory
    plan["tensorrt_build_host_bytes"] = {k: build_host_memory(v)["peak"] for k, v in plan["weight_bytes"].items()}
    if a.gpu_memory is not None or a.stages is not None:
        from jambatrt.export.stage_plan import plan_stages
        plan["stage_plan"] = plan_stages(cfg, stages=a.stages, gpu_bytes=_gpu_bytes(a), context=a.context,
                                         batch=a.batch)
    if a.json:
        print(json.dumps(plan, indent=2))
    else:
        from rich.table import Table
        t = Table(title=f"{a.preset or a.out}: memory plan (batch {plan['batch']}, context {plan['context']:,})")
        t.add_column("item")
        t.add_column("value", justify="right")
        gib = 1 << 30
        t.add_row("parameters (total / active per token)", f"{plan['params_total']:,} / {plan['params_active']:,}")
        t.add_row("weights bf16", f"{plan['weight_bytes']['bfloat16'] / gib:.2f} GiB")
        t.add_row("weights experts-int8", f"{plan['weight_bytes']['experts_int8'] / gib:.2f} GiB")
        t.add_row("KV cache per token (bf16)", f"{plan['kv_bytes_per_token']:,} B")
        t.add_row("KV cache at context", f"{plan['kv_bytes_at_context'] / gib:.2f} GiB")
        kv_ort = plan["kv_bytes_at_context_ort"]
        t.add_row("KV cache at context, ort engine (float32 / --kv-cache int8)",
                  f"{kv_ort['float32'] / gib:.2f} / {kv_ort['int8'] / gib:.2f} GiB")
        t.add_row("Mamba state per sequence", f"{plan['state_bytes_per_sequence'] / (1 << 20):.2f} MiB")
        host = plan["host_bytes"]
        t.add_row("host memory: export / ort build (streamed)",
                  f"{host['export'] / gib:.2f} GiB / {host['build_ort'] / gib:.2f} GiB")
        t.add_row("host memory: ort engine run (pre-packed GEMM weights)", f"{host['run_ort'] / gib:.2f} GiB")
        trt_host = plan["tensorrt_build_host_bytes"]   # engines.tensorrt.build_host_memory: the weights once
        t.add_row("host memory: tensorrt build, int8 experts / bf16 (the weights once, + TensorRT's own)",
                  f"{trt_host['experts_int8'] / 1e9:.1f} GB / {trt_host['bfloat16'] / 1e9:.1f} GB")
        if "prefill_chunk" in plan:
            big = plan["largest_activation"]
            t.add_row("prefill chunk (every tensor < 2^31 elements)",
                      f"{plan['prefill_chunk']:,} tokens" if plan["prefill_chunk"] else
                      "none: at this context even one token's step holds a tensor over 2^31 elements")
            t.add_row("largest activation tensor", f"{big['name']}: {big['elements']:,}")
            for name, n in plan["weight_tensors_over_limit"].items():
                t.add_row("weight tensor over 2^31 (split for TensorRT)", f"{name}: {n:,}")
            if plan["expert_groups"] > 1:
                t.add_row("TensorRT expert groups per MoE layer",
                          f"{plan['expert_groups']} of <= {plan['experts_per_group']} experts (each < 2^31 elements)")
            t.add_row("activations per chunk (upper estimate)", f"{plan['activation_bytes_per_chunk'] / gib:.2f} GiB")
            t.add_row("total bf16 / experts-int8",
                      f"{plan['total_bytes']['bfloat16'] / 1e9:.1f} GB / {plan['total_bytes']['experts_int8'] / 1e9:.1f} GB")
            t.add_row("verdict", plan["verdict"])
        Console().print(t)
        if "stage_plan" in plan:
            from jambatrt.export.stage_plan import describe
            sp = plan["stage_plan"]
            print(f"pipeline stages: {sp['stages']} (context {sp['context']:,}, batch {sp['batch']}, prefill chunk "
                  f"{sp['chunk']:,}, weights {sp['weights']}; "
                  + ("every stage fits" if sp["fits"] else "NOT every stage fits" if sp["fits"] is False else "no device size")
                  + ")")
            for line in describe(sp):
                print(f"  {line}")
    return 0


# ---- verify ----------------------------------------------------------------------------------
def cmd_verify(a) -> int:
    from jambatrt.artifact import read_manifest, verify_files

    manifest = read_manifest(a.out)          # its own digest and every path in it
    files = manifest["files"]
    total = sum(int(e.get("bytes", 0)) for e in files.values())
    with _progress_bytes() as prog:
        prog.step(f"sha256 of {len(files)} files")
        prog.start_bytes("verify", total)
        verify_files(a.out, manifest, full=True, on_bytes=prog.advance)
    print(f"verified {a.out}: manifest digest and all {len(files)} files ({total / 1e9:.2f} GB) match their sha256")
    return 0


# ---- plugins ---------------------------------------------------------------------------------
def cmd_plugins(a) -> int:
    # the kernels must be compiled, not interpreted: Triton reads TRITON_INTERPRET when they are defined
    os.environ.pop("TRITON_INTERPRET", None)
    from jambatrt.plugins.gpu.aot import write_plugins

    archs = [s for s in a.arch.split(",") if s.strip()]
    dtypes = [s.strip() for s in a.dtype.split(",") if s.strip()]
    with console.status("compiling the GPU kernels ahead of time") as status:
        index = write_plugins(a.out, archs, dtypes=dtypes, jobs=a.jobs, force=a.force,
                              progress=lambda msg: status.update(f"compiling {msg}"))
    for k in index["kernels"]:
        r = k["resources"]
        usage = (f"  regs {r['registers']:>3}  stack {r['stack']:>4} B  occupancy {r['occupancy']['occupancy']:.0%}"
                 if r else "  (no cuobjdump: registers unknown)")
        print(f"  {k['arch']}  {k['kernel']:<34} warps {k['num_warps']}  shared {k['shared_bytes']:>6} B"
              f"{usage}  scratch {sum(k['scratch_bytes'].values())} B")
    print(f"{len(index['kernels'])} kernels (triton {index['triton_version']}) -> {a.out}/index.json")
    return 0


# ---- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jambatrt",
        description="Export Jamba-family models (Mamba + attention + MoE) to ONNX Runtime / TensorRT / "
                    "AOTInductor engines, "
                    "check them against eager PyTorch, profile and serve them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="checkpoint or preset -> artifact dir (program.pt2, model.onnx, manifest)",
                       description="Trace a HF-format Jamba checkpoint (config.json + safetensors) or a seeded "
                                   "random preset with torch.export and write an artifact directory.")
    e.add_argument("checkpoint", nargs="?", help="HF checkpoint directory (config.json + *.safetensors)")
    e.add_argument("--preset", help="write and export a seeded random preset instead (tiny, small, bench, ...)")
    e.add_argument("-o", "--out", required=True, help="artifact directory to create")
    e.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16; float16 is refused")
    e.add_argument("--experts-int8", dest="experts_int8", action=argparse.BooleanOptionalAction, default=True,
                   help="ExpertsInt8: int8 expert weights with per-channel scales (default on)")
    e.add_argument("--weights-int8", action="store_true",
                   help="int8 weights with per-output-channel scales for every other linear layer too (not the "
                        "router, not the embedding); the CPU engine's fastest decode")
    e.add_argument("--seed", type=SEED, default=0, help="seed for --preset weights (default 0)")
    e.add_argument("--max-seq", type=TOKENS, default=None, help="largest sequence length (default: max_position_embeddings)")
    e.add_argument("--force", action="store_true", help="replace an existing OUT (only once the new one is complete)")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="build an engine from an exported artifact",
                       description="Lower the artifact's model.onnx for a backend and write engines/<backend>/.")
    b.add_argument("out", help="artifact directory written by `jambatrt export`")
    b.add_argument("--backend", required=True, choices=["ort", "tensorrt", "aoti"])
    b.add_argument("--attention", default="kernel", choices=["kernel", "gqa"],
                   help="ort only: our memory-flat attention kernel (default) or com.microsoft::GroupQueryAttention")
    b.add_argument("--prefill-compute", default=None, choices=["float32", "bfloat16"],
                   help="ort only, --weights-int8 artifacts: the int8 kernels' GEMMs over prefill chunks in float32 "
                        "(default; on CPUs with VNNI an exact integer GEMM on 24-bit fixed-point activations, float32's "
                        "error class) or bfloat16 (CPUs with AVX512-BF16 or AMX: ~1.2x faster again, ~2^-8 relative "
                        "error; validate then uses the bfloat16 tolerances); decode stays float32")
    b.add_argument("--kv-cache", default=None, choices=["float32", "int8"],
                   help="ort only: the attention layers' KV cache in float32 (default) or int8 with a float32 scale per "
                        "token, head and 32 channels (3.6x less memory at long context; attention reads the "
                        "quantised keys and values, and validate compares with an eager model that rounds them "
                        "the same way)")
    b.add_argument("--decode", default=None, choices=["native", "graph"],
                   help="ort only: decode steps (one token) through the native step, every layer on the same CPU kernels "
                        "with no ONNX Runtime graph in between (default; models it does not cover, e.g. float experts or "
                        "--attention gqa, decode through the graph), or through the ONNX Runtime graph as prefill")
    b.add_argument("--max-batch", type=COUNT, default=None, help="tensorrt, aoti: largest batch (default 4)")
    b.add_argument("--max-seq", type=TOKENS, default=None, help="tensorrt, aoti: longest context (default: the model's)")
    b.add_argument("--prefill-chunk", type=TOKENS, default=None,
                   help="tensorrt, aoti: prefill chunk (default: the chunking plan, every tensor < 2^31 elements)")
    b.add_argument("--moe", default="grouped", choices=["grouped", "fused"],
                   help="tensorrt only: MoE layers as route + grouped-GEMM plugins (default; reads each expert "
                        "weight tile once per 64 routed tokens) or one fused plugin per layer (recomputes gate/up "
                        "per output block: for decode-only engines)")
    b.add_argument("--stages", type=_int_option(1, 4096), default=None,
                   help="split the step graph into N pipeline stages (contiguous layer ranges), one engine each")
    b.add_argument("--stage-plan", choices=["auto"], default=None,
                   help="auto: the fewest stages in which every stage fits --gpu-memory")
    b.add_argument("--gpu-memory", default=None, help="device size for the stage plan, e.g. 80GB")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("validate", help="engine vs eager reference parity; exit 1 when it fails",
                       description="Run the engine and a reference on the same random ids at each length and "
                                   "compare logits (max/mean abs error, top-1 agreement).")
    v.add_argument("out", help="artifact directory with a built engine")
    v.add_argument("--backend", required=True, choices=["ort", "tensorrt", "aoti"])
    v.add_argument("--lengths", type=_lengths, default=[1, 17, 4096], help="comma-separated (default 1,17,4096)")
    v.add_argument("--reference", default="eager", choices=["eager", "hf"],
                   help="eager: this package's model on the plain <op>_ref ops; hf: transformers' Jamba")
    v.add_argument("--batch", type=COUNT, default=1)
    v.add_argument("--seed", type=SEED, default=0)
    v.add_argument("--report", help="report JSON path (default OUT/reports/parity-BACKEND-REFERENCE.json); "
                                    "a markdown summary and PNG plots are written beside it")
    v.add_argument("--no-state", action="store_true",
                   help="compare logits only, not the final state tensors (present.layer{i}.*)")
    v.set_defaults(func=cmd_validate)

    pr = sub.add_parser("profile", help="prefill/decode tokens/s and peak RSS vs the eager reference",
                        description="Each (engine or reference, length) runs in a fresh child process: warm-up, "
                                    "timed prefill repeats (min/median/max), timed decode steps; peak RSS of the "
                                    "child. Writes JSON, a markdown summary and a PNG (tok/s and memory vs length).")
    pr.add_argument("out", help="artifact directory with a built engine")
    pr.add_argument("--backend", required=True, choices=["ort", "tensorrt", "aoti"])
    pr.add_argument("--lengths", type=_lengths, default=[1, 4096], help="comma-separated (default 1,4096)")
    pr.add_argument("--reference", default="eager", choices=["eager", "none"],
                    help="eager: this package's eager model on torch.ops.jamba custom ops (default); none")
    pr.add_argument("--modes", default="prefill,decode", help="prefill,decode (default), prefill or decode")
    pr.add_argument("--repeats", type=COUNT, default=3, help="timed prefill runs per length (default 3)")
    pr.add_argument("--budget-s", type=SECONDS, default=60.0,
                    help="stop repeating a length once its timed prefills took this long (default 60; >= 1 run)")
    pr.add_argument("--warmup-tokens", type=_int_option(0, TOKENS_MAX), default=4096, help="untimed warm-up prefill length (default 4096)")
    pr.add_argument("--decode-tokens", type=TOKENS, default=32, help="timed decode steps (default 32)")
    pr.add_argument("--batch", type=COUNT, default=1)
    pr.add_argument("--reference-max-length", type=TOKENS, default=65536,
                    help="longest length the reference is timed at (default 65536; longer: null)")
    pr.add_argument("--timeout", type=SECONDS, default=3600, help="seconds per child process (default 3600)")
    pr.add_argument("--report", help="profile JSON path (default OUT/reports/profile-BACKEND.json)")
    pr.add_argument("--plot", help="PNG path (default: beside the report, .png)")
    pr.set_defaults(func=cmd_profile)

    g = sub.add_parser("generate", help="generate text or tokens with an engine (greedy or sampled), streaming",
                       description="Prefill the prompt, then decode token by token with the carried state. "
                                   "Text (--prompt, --chat, --chat-file) goes through the artifact's tokenizer and "
                                   "chat template and streams decoded text until an EOS id of its generation config.")
    g.add_argument("out", help="artifact directory with a built engine")
    g.add_argument("--backend", required=True, choices=["ort", "tensorrt", "aoti"])
    g.add_argument("--prompt", default=None, help="a text prompt, encoded with the artifact's tokenizer")
    g.add_argument("--chat", default=None, metavar="MESSAGE",
                   help="a user message, with the artifact's chat template applied (add_generation_prompt)")
    g.add_argument("--chat-file", default=None, metavar="FILE",
                   help='a JSON list of {"role": ..., "content": ...} messages, with the chat template applied')
    g.add_argument("--prompt-ids", default=None, type=_prompts,
                   help="comma-separated token ids; several prompts separated by ';' (e.g. '1,2,3;4,5')")
    g.add_argument("--max-new-tokens", type=_int_option(0, TOKENS_MAX), default=32)
    g.add_argument("--temperature", type=_float_option(0.0, 1e6), default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=_float_option(0.0, 1.0, lo_open=True), default=1.0)
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--eos-id", type=TOKEN_ID, default=None,
                   help="stop a sequence at this token (text modes: default the generation config's EOS ids)")
    g.add_argument("--json", action="store_true",
                   help='print {"prompt_ids": [...], "generated_ids": [...], "tokens_per_s": float} (+ "text")')
    g.add_argument("--stages", action="store_true", help="run the pipeline-stage engines (`build --stages N`)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("deploy", help="write a Triton Inference Server model repository; --serve runs it",
                       description="Write a Triton model repository from an artifact (Python-backend models "
                                   "NAME_prefill, NAME_sequence, NAME_generate running the ONNX Runtime engine; "
                                   "NAME_tensorrt / NAME_aoti when a TensorRT engine / AOTInductor package is built: sequence models "
                                   "keeping the state on the server), atomically; with --serve start "
                                   "tritonserver on 127.0.0.1 until Ctrl-C / SIGTERM.")
    d.add_argument("out", help="artifact directory with a built engine")
    d.add_argument("--repository", required=True, help="model repository directory to write")
    d.add_argument("--force", action="store_true", help="replace an existing repository")
    d.add_argument("--name", default="jamba", help="model name prefix (default jamba)")
    d.add_argument("--max-tokens", type=TOKENS, default=None,
                   help="token budget per request / sequence (default: the artifact's max sequence length)")
    d.add_argument("--max-sequences", type=_int_option(1, 1 << 20), default=64, help="live sequences of NAME_sequence (default 64)")
    d.add_argument("--idle-seconds", type=SECONDS, default=60.0,
                   help="drop a sequence's state after this long without requests (default 60)")
    d.add_argument("--instances", type=_int_option(1, 1024), default=1, help="instances of each Python model (default 1)")
    d.add_argument("--execution-env", default=None,
                   help="write EXECUTION_ENV_PATH=DIR into the Python models (for a server not started by "
                        "jambatrt; DIR: a venv with numpy<2 and jambatrt)")
    d.add_argument("--stages", action="store_true",
                   help="serve the pipeline-stage engines (`build --stages N`): one model per stage, each keeping its "
                        "layers' state per sequence, chained by the ensemble NAME_sequence (same interface as the "
                        "single-engine sequence model)")
    d.add_argument("--stage-devices", default="cpu", choices=["cpu", "gpu"],
                   help="with --stages: stage instances on CPU (KIND_CPU, default) or stage k on GPU k (KIND_GPU, gpus: [k]; with --nodes, k counts the node's own stages)")
    d.add_argument("--stage-backend", default="ort", choices=["ort", "aoti"],
                   help="with --stages: serve the ONNX Runtime stage engines (`build --stages N`, default) or the "
                        "AOTInductor ones (`build --backend aoti --stages N`)")
    d.add_argument("--nodes", type=_int_option(1, 1024), default=1,
                   help="with --stages: split the stages over N servers (contiguous groups), one repository per node; "
                        "each node but the last forwards to the next over gRPC (docs/multinode.md)")
    d.add_argument("--node", type=_int_option(0, 1023), default=0,
                   help="with --nodes: write (and --serve) node K's repository (default 0: the one clients call, "
                        "through NAME_sequence)")
    d.add_argument("--next-node", default=None, metavar="HOST:PORT",
                   help="with --nodes: the gRPC address of node K+1's server (every node but the last)")
    d.add_argument("--hop-timeout", type=SECONDS, default=300.0,
                   help="with --nodes: seconds a request waits for the next node's answer before it fails (default 300)")
    d.add_argument("--serve", action="store_true", help="start tritonserver on 127.0.0.1 and wait for Ctrl-C")
    d.add_argument("--http-port", type=PORT, default=8000)
    d.add_argument("--grpc-port", type=PORT, default=8001)
    d.add_argument("--metrics-port", type=PORT, default=8002)
    d.add_argument("--serve-env", default=None,
                   help="environment with nvidia-pytriton and numpy<2 (default $JAMBATRT_SERVE_ENV or .venv-serve)")
    d.set_defaults(func=cmd_deploy)

    i = sub.add_parser("inspect", help="shapes and memory plan (weights, KV cache, Mamba state)")
    i.add_argument("out", nargs="?", help="artifact directory")
    i.add_argument("--preset", help="a named preset instead of an artifact")
    i.add_argument("--context", type=TOKENS, default=None, help="context length for the KV estimate (default: max)")
    i.add_argument("--batch", type=COUNT, default=1)
    i.add_argument("--gpu-memory", default=None,
                   help="device size (e.g. 80GB): add the pipeline-stage plan (fewest stages that fit, or --stages)")
    i.add_argument("--stages", type=_int_option(1, 4096), default=None, help="stage count for the stage plan")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    vf = sub.add_parser("verify", help="full integrity check: sha256 of every file of an artifact",
                        description="Check the manifest's own digest, that every path stays inside the artifact, "
                                    "and the sha256 and size of every listed file, reading all of them. Other "
                                    "commands hash small files on every load and large ones (the weights) on "
                                    "first use only, recording the check in OUT/.verified.json; verify ignores "
                                    "that record and refreshes it.")
    vf.add_argument("out", help="artifact directory")
    vf.set_defaults(func=cmd_verify)

    pl = sub.add_parser("plugins", help="compile the GPU kernels ahead of time to PTX + cubin (no GPU needed)",
                        description="Compile every Triton kernel for each arch; writes DIR/<arch>/<kernel>.ptx/.cubin "
                                    "and DIR/index.json (signatures, launch parameters, sha256).")
    pl.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90 (default)")
    pl.add_argument("-o", "--out", required=True, help="output directory")
    pl.add_argument("--dtype", default="bfloat16,float32", help="activation dtypes (default bfloat16,float32)")
    pl.add_argument("--jobs", type=_int_option(1, 1024), default=None, help="parallel compiles (default: CPU count)")
    pl.add_argument("--force", action="store_true", help="replace an existing DIR")
    pl.set_defaults(func=cmd_plugins)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers send), unwound like Ctrl-C so temp directories are removed."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args) or 0
    except JambaTRTError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)   # unwrapped: greppable, copyable
        return e.exit_code
    except Terminated:
        console.print("terminated")
        return 143
    except OSError as e:
        # the file system said no (read-only, permission, a directory where a file goes, a symlink
        # loop, a full disk): the user's to fix, and the OS message names the path
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return JambaTRTError.exit_code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as e:      # noqa: BLE001 - a bug: still one line, the traceback on request
        if os.environ.get("JAMBATRT_TRACEBACK") == "1":
            raise
        print(f"error: internal error (a bug in jambatrt; JAMBATRT_TRACEBACK=1 shows where): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
