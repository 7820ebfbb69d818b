"""`make bench-peer`: the ONNX Runtime engine against llama.cpp on the same Jamba checkpoint.

    python -m jambatrt.validate.peer --out bench/peer --cache build/peer [--rounds 5]
        [--lengths 512,4096,16384] [--prefill-lengths 512,4096] [--decode-tokens 16] [--threads 2]
        [--kv-cache float32|int8] [--flat-contexts 1024,4096,16384,65536] [--flat-steps 32]

1. llama.cpp, built once from the copy vendored in the `llama-cpp-python` sdist on the registry
   (`pip download --no-deps --no-binary :all:`), CPU only, cached under --cache.
2. The `peer` preset (config.py: 426e6 parameters) written as a HF checkpoint with a sentencepiece
   `tokenizer.model` trained offline on seeded pseudo-text (convert_hf_to_gguf.py needs one; the
   model's 32000 ids are padded past the tokenizer's pieces), converted to F32 and quantised to Q8_0.
3. Two jambatrt artifacts of the same checkpoint, ORT engines built: the default export (float32
   weights, ExpertsInt8) and --weights-int8 (every linear layer but the router int8).
4. Rounds: in each, every (engine, precision) runs prefill at each length and decode after each
   length, the engines paired length by length and taking turns to go first (this machine's
   memory bandwidth and CPU share drift by 2-4x within minutes, so only ratios measured side by
   side mean anything); a ratio per round, then their median.
   llama.cpp: `llama-bench -p L -n 0` (prefill) and `-p 0 -n T -d L` (T tokens after L of
   context), one process per test so each has its own peak RSS (wait4). jambatrt: `jambatrt
   profile` (a fresh child per length: prefill L, then T decode steps from that state).
5. Decode per token against context (`validate/decode_flat.py` in a child, each artifact: one engine
   per context, 1K to 64K by default, the steps round-robin over the contexts, ratios to the shortest
   context's step of the same round): flat means every median ratio within FLAT_WITHIN; beside it the
   floor the same rounds measured (each context's KV cache read plainly, nothing computed).
6. Logits: llama.cpp's (`llama-debug --save-logits`, the last prompt position) against this
   package's eager model on the same ids: F32 GGUF vs the float model, Q8_0 vs the
   --weights-int8 artifact.

Writes OUT/peer.json, OUT/peer.md, OUT/peer.png."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from jambatrt.threads import OMP_ENV

PRESET = "peer"
TARGET = 1.2        # the issue's bar: >= 1.2x llama.cpp at equal precision
FLAT_WITHIN = 1.2   # and decode per token within 20% from 1K to 64K of context
LLAMA_TOOLS = ("llama-bench", "llama-quantize", "llama-debug")


def _log(msg: str) -> None:
    print(f"[bench-peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    _log(" ".join(str(c) for c in cmd)[:300])
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---- 1. llama.cpp --------------------------------------------------------------------------
def llama_cpp(cache: Path) -> tuple[Path, Path, str]:
    """(bin dir, vendored source dir, llama-cpp-python version); builds once."""
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              "llama-cpp-python", "-d", cache])
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    src = cache / f"llama_cpp_python-{version}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as t:
            t.extractall(cache, filter="data")
    vendored = src / "vendor" / "llama.cpp"
    build = cache / "llama.cpp-build"
    bins = build / "bin"
    if not all((bins / t).is_file() for t in LLAMA_TOOLS):
        _run(["cmake", "-S", vendored, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_APP=OFF", "-DBUILD_SHARED_LIBS=OFF"]
             + (["-G", "Ninja"] if shutil.which("ninja") else []))
        _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *LLAMA_TOOLS])
    return bins, vendored, version


# ---- 2. checkpoint, tokenizer, GGUF ------------------------------------------------------------
def _pseudo_text(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Seeded pseudo-words (no data set is downloaded): enough variety for a few hundred pieces."""
    rng = np.random.default_rng(seed)
    syll = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(2000)]
    return [" ".join(rng.choice(words, rng.integers(4, 16))) for _ in range(n_lines)]


def checkpoint(cache: Path) -> Path:
    from jambatrt.export.checkpoint import write_preset
    ckpt = cache / "ckpt"
    if not (ckpt / "config.json").is_file():
        # no BPE tokenizer.json: llama.cpp's converter reads the sentencepiece model made below
        write_preset(PRESET, ckpt, seed=0, tokenizer=False)
    if not (ckpt / "tokenizer.model").is_file():
        try:
            import sentencepiece as spm
        except ImportError:
            raise SystemExit("bench-peer needs sentencepiece (pip install sentencepiece) to make the "
                             "checkpoint's tokenizer.model for convert_hf_to_gguf.py") from None
        corpus = cache / "tokenizer-corpus.txt"
        corpus.write_text("\n".join(_pseudo_text()) + "\n")
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(cache / "tokenizer"), vocab_size=1000,
                                       model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                       minloglevel=2)
        shutil.copy(cache / "tokenizer.model", ckpt / "tokenizer.model")
    return ckpt


def gguf(cache: Path, bins: Path, vendored: Path, ckpt: Path) -> dict[str, Path]:
    f32, q8 = cache / "peer-f32.gguf", cache / "peer-q8_0.gguf"
    if not f32.is_file():
        env = {**os.environ, "PYTHONPATH": str(vendored / "gguf-py")}
        _run([sys.executable, vendored / "convert_hf_to_gguf.py", ckpt, "--outtype", "f32", "--outfile", f32],
             env=env, stdout=subprocess.DEVNULL)
    if not q8.is_file():
        _run([bins / "llama-quantize", f32, q8, "Q8_0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"float32": f32, "int8": q8}


# --kv-cache: jambatrt's engine setting, and llama-bench's matching cache (q8_0 K and V need its flash attention)
KV_CACHES = {"float32": [], "int8": ["-fa", 1, "-ctk", "q8_0", "-ctv", "q8_0"]}


def artifacts(cache: Path, ckpt: Path, kv_cache: str = "float32") -> dict[str, Path]:
    out = {"float32": cache / "art-float32", "int8": cache / "art-int8"}
    jt = [sys.executable, "-m", "jambatrt"]
    for prec, art in out.items():
        if not (art / "manifest.json").is_file():
            _run(jt + ["export", ckpt, "-o", art, "--force"] + (["--weights-int8"] if prec == "int8" else []),
                 stdout=subprocess.DEVNULL)
        # rebuilt every run (seconds: graph passes only), so a cached artifact runs the current pass list
        _run(jt + ["build", art, "--backend", "ort", "--kv-cache", kv_cache], stdout=subprocess.DEVNULL)
    return out


# ---- 4. timing -------------------------------------------------------------------------------
# Runs argv[1:] as its child and prints the child's peak RSS (KiB) as its last stderr line. Measured
# from this small process, not from the bench's own: a child forked (or vforked) by a process that
# holds GBs of models counts that process's resident pages in its ru_maxrss until it execs.
_PEAK_RSS = ("import os, sys\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    os.execv(sys.argv[1], sys.argv[1:])\n"
             "_, status, usage = os.wait4(pid, 0)\n"
             "sys.stderr.write(f'\\n{usage.ru_maxrss}\\n')\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def _wait_rss(cmd, env=None) -> tuple[str, int]:
    """Run cmd; (stdout, peak RSS bytes of cmd's own process)."""
    p = subprocess.run([sys.executable, "-c", _PEAK_RSS, *map(str, cmd)], capture_output=True, env=env, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    return p.stdout, int(p.stderr.strip().splitlines()[-1]) * 1024


def llama_bench(bins: Path, model: Path, mode: str, length: int, decode_tokens: int, threads: int,
                kv_cache: str = "float32") -> dict:
    args = ["-p", length, "-n", 0] if mode == "prefill" else ["-p", 0, "-n", decode_tokens, "-d", length]
    args += KV_CACHES[kv_cache]
    # llama.cpp runs with its own OpenMP defaults, not the wait settings this package sets for its kernels
    env = {k: v for k, v in os.environ.items() if k not in OMP_ENV}
    out, rss = _wait_rss([bins / "llama-bench", "-m", model, "-t", threads, "-r", 1, "-o", "json", *args], env=env)
    row = json.loads(out)[0]
    return {"tokens_per_s": row["avg_ts"], "peak_rss_bytes": rss,
            "settings": {k: row.get(k) for k in ("n_threads", "flash_attn", "type_k", "type_v", "n_batch",
                                                 "n_ubatch", "cpu_info", "build_commit")}}


# jambatrt's untimed warm-up prefill: up to this many tokens (llama-bench warms a prompt test up with the whole
# prompt; a 64-token warm-up, used before 2026-12-04, left the first full-size run's costs in jambatrt's time)
WARMUP_TOKENS = 4096


def jambatrt_profile(art: Path, lengths: list[int], decode_tokens: int, report: Path) -> dict:
    from jambatrt.validate.profile import run_profile
    rep = run_profile(art, "ort", lengths, reference=None, repeats=1, warmup_tokens=WARMUP_TOKENS,
                      decode_tokens=decode_tokens, decode_warmup=2, budget_s=1.0)
    report.write_text(json.dumps(rep, indent=1))
    return {(r["mode"], r["length"]): {"tokens_per_s": r["tokens_per_s"], "peak_rss_bytes": r["peak_rss_bytes"],
                                       "decode_path": rep.get("engine_decode")}
            for r in rep["results"]}


def run_rounds(bins, ggufs, arts, lengths, rounds, decode_tokens, threads, out: Path,
               prefill_lengths=None, kv_cache: str = "float32") -> list[dict]:
    """Pairs measured back to back: for each precision and length, jambatrt's child (prefill L, then
    decode after L) and llama-bench's tests at L run one right after the other, in turn first (odd
    rounds jambatrt first, even rounds llama.cpp first), so that a pair spans minutes, not a round.
    prefill_lengths: the lengths whose prefill is compared (default: all of `lengths`; jambatrt
    prefills every length anyway before it decodes, llama-bench only for a prefill test)."""
    rows = []
    prefill_at = set(lengths if prefill_lengths is None else prefill_lengths)
    for r in range(rounds):
        for prec in ("float32", "int8"):
            for L in lengths:
                modes = [m for m in ("prefill", "decode") if m == "decode" or L in prefill_at]

                def theirs():
                    res = {}
                    for mode in modes:
                        _log(f"round {r + 1}/{rounds}, {prec}: llama.cpp {mode} {L}")
                        res[mode] = llama_bench(bins, ggufs[prec], mode, L, decode_tokens, threads, kv_cache)
                    return res

                def ours():
                    _log(f"round {r + 1}/{rounds}, {prec}: jambatrt {L}")
                    return jambatrt_profile(arts[prec], [L], decode_tokens, out / f"profile-{prec}-round{r + 1}-{L}.json")

                if r % 2 == 0:
                    j_all, peer_all = ours(), theirs()
                else:
                    peer_all = theirs()
                    j_all = ours()
                for mode in modes:
                    j, peer = j_all[(mode, L)], peer_all[mode]
                    rows.append({"round": r + 1, "precision": prec, "mode": mode, "length": L,
                                 "jambatrt_tokens_per_s": j["tokens_per_s"], "jambatrt_peak_rss_bytes": j["peak_rss_bytes"],
                                 "jambatrt_decode": j["decode_path"],
                                 "llama_cpp_tokens_per_s": peer["tokens_per_s"],
                                 "llama_cpp_peak_rss_bytes": peer["peak_rss_bytes"], "llama_cpp_settings": peer["settings"],
                                 "ratio": j["tokens_per_s"] / peer["tokens_per_s"]})
                (out / "peer-rows.json").write_text(json.dumps(rows, indent=1))   # partial results survive a stop
    return rows


def flat_decode(arts: dict, contexts: list[int], steps: int, out: Path) -> list[dict]:
    """validate/decode_flat.py on each artifact, in a child (its engines, one per context, hold the
    caches of every context at once): per precision, the median decode ms and ratio per context."""
    res = []
    for prec, art in arts.items():
        rep = out / f"flat-{prec}.json"
        _run([sys.executable, "-m", "jambatrt.validate.decode_flat", art, "--contexts", ",".join(map(str, contexts)),
              "--steps", steps, "--flat-within", FLAT_WITHIN, "--report", rep])
        doc = json.loads(rep.read_text())
        res.append({"precision": prec, "flat": doc["flat"], "worst_median_ratio": doc["worst_median_ratio"],
                    "worst_context": doc["worst_context"], "floor_at_worst": doc["floor_at_worst"], "steps": steps,
                    "rows": [{k: r[k] for k in ("context", "decode_ms_median", "ratio_to_shortest_median", "kv_bytes",
                                                "kv_read_ms_median", "floor_ratio_median")} for r in doc["rows"]]})
    return res


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["precision"], r["mode"], r["length"]) for r in rows}, key=lambda k: (k[0], k[1] != "prefill", k[2]))
    for prec, mode, L in keys:
        rs = [r for r in rows if (r["precision"], r["mode"], r["length"]) == (prec, mode, L)]
        med = statistics.median(r["ratio"] for r in rs)
        out.append({"precision": prec, "mode": mode, "length": L, "ratios": [round(r["ratio"], 3) for r in rs],
                    "median_ratio": med, "meets_target": med >= TARGET,
                    "jambatrt_tokens_per_s": statistics.median(r["jambatrt_tokens_per_s"] for r in rs),
                    "llama_cpp_tokens_per_s": statistics.median(r["llama_cpp_tokens_per_s"] for r in rs),
                    "jambatrt_peak_rss_bytes": max(r["jambatrt_peak_rss_bytes"] for r in rs),
                    "llama_cpp_peak_rss_bytes": max(r["llama_cpp_peak_rss_bytes"] for r in rs)})
    return out


# ---- 5. logits -------------------------------------------------------------------------------
def logits_check(bins: Path, ggufs: dict, arts: dict, ckpt: Path, work: Path) -> list[dict]:
    import torch

    from jambatrt.export.checkpoint import Checkpoint
    from jambatrt.export.weights import build_model, load_artifact_model

    prompt = " ".join(_pseudo_text(3, seed=7))
    results = []
    for prec, model_path in ggufs.items():
        d = work / f"logits-{prec}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        _wait_rss([bins / "llama-debug", "-m", model_path, "-p", prompt, "--save-logits", "--logits-output-dir", d,
                   "-t", "2", "-c", "512"])
        logit_file = next(p for p in d.glob("*.bin") if not p.name.endswith("-tokens.bin"))
        token_file = next(d.glob("*-tokens.bin"))
        theirs = np.fromfile(logit_file, np.float32)
        ids = np.fromfile(token_file, np.int32).astype(np.int64)
        if prec == "float32":     # llama.cpp's F32 holds float experts: compare with the float model
            c = Checkpoint(ckpt)
            model, ours_name = build_model(c.config, c, experts_int8=False), "eager float32 model (float experts)"
        else:
            model = load_artifact_model(arts[prec])
            ours_name = "eager --weights-int8 artifact model"
        with torch.no_grad():
            ours = model(torch.from_numpy(ids)[None])[0][0, -1].float().numpy()
        del model
        diff = np.abs(ours - theirs)
        results.append({"precision": prec, "gguf": model_path.name, "ours": ours_name, "tokens": int(ids.size),
                        "max_abs_diff": float(diff.max()), "max_abs_logit": float(np.abs(ours).max()),
                        "relative_max_diff": float(diff.max() / np.abs(ours).max()),
                        "top1_equal": bool(ours.argmax() == theirs.argmax()),
                        "top5_overlap": len(set(np.argsort(-ours)[:5]) & set(np.argsort(-theirs)[:5])) / 5})
    return results


SEMANTICS = [
    "llama.cpp Q8_0 quantises weights in blocks of 32 (one fp16 scale each) and the activations of every "
    "quantised matmul to Q8_0 too; jambatrt --weights-int8 has one fp32 scale per output channel and keeps "
    "activations in float32.",
    "llama.cpp Q8_0 also quantises the token embedding; jambatrt keeps it float32 (decode reads one row).",
    "The float32 rows compare llama.cpp F32 (float experts) with jambatrt's default artifact, whose experts are "
    "ExpertsInt8 (jambatrt's float-experts export is a dense comparison path, E/top_k times the work): fewer bytes "
    "per token on jambatrt's side. The logits check compares F32 with jambatrt's float model.",
    "KV caches: by default llama.cpp keeps f16 (2 bytes an element), jambatrt float32 (4); with --kv-cache int8 "
    "jambatrt keeps int8 with a float32 scale per 32 channels (1.125 bytes) and llama-bench runs with "
    "-ctk q8_0 -ctv q8_0 -fa 1 (int8 with an f16 scale per 32: 1.0625 bytes; a quantised V cache needs its "
    "flash attention).",
    "llama-bench runs with OpenMP's defaults (the OMP_WAIT_POLICY/GOMP_SPINCOUNT this package sets for its own "
    "kernels, threads.py, are removed from its environment); before 2026-12-02 it inherited `make`'s "
    "OMP_WAIT_POLICY=PASSIVE, which made its decode ~2x slower and the ratios of earlier reports too high.",
    "Both sides' prefill computes the last position's logits only (llama-bench's prompt test; jambatrt's "
    "prefill_last).",
    "Warm-up, untimed: llama-bench runs each prompt test once with the whole prompt and each generation test "
    f"with one token; jambatrt's profile child prefills min(L, {WARMUP_TOKENS}) tokens and decodes 2 steps "
    "(before 2026-12-04 it prefilled 64 tokens: the first full-size run's one-time costs counted against it).",
]


# ---- report ----------------------------------------------------------------------------------
def write_report(out: Path, summary: list[dict], rows: list[dict], logits: list[dict], meta: dict,
                 flat: list[dict] = ()) -> None:
    doc = {"target_ratio": TARGET, "summary": summary, "rows": rows, "logits": logits, "semantics": SEMANTICS,
           "flat_within": FLAT_WITHIN, "flat_decode": list(flat), **meta}
    (out / "peer.json").write_text(json.dumps(doc, indent=1))
    gb = 1e9
    md = [f"# jambatrt ORT vs llama.cpp ({meta['llama_cpp']}), preset `{PRESET}`", "",
          f"{meta['machine']}; {meta['threads']} threads; {meta['rounds']} interleaved rounds; "
          f"KV cache {meta['kv_cache']} (see the semantic differences); "
          "ratio = jambatrt tok/s / llama.cpp tok/s per round, then the median; jambatrt's decode steps ran "
          f"through: {', '.join(sorted({str(r.get('jambatrt_decode')) for r in rows}))}.", "",
          "| precision | test | ratios per round | median | jambatrt tok/s | llama.cpp tok/s | jambatrt peak GB | llama.cpp peak GB |",
          "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        test = f"{'pp' if s['mode'] == 'prefill' else 'tg after '}{s['length']}"
        md.append(f"| {s['precision']} | {test} | {', '.join(f'{x:.2f}' for x in s['ratios'])} | "
                  f"**{s['median_ratio']:.2f}x**{'' if s['meets_target'] else ' (< 1.2)'} | "
                  f"{s['jambatrt_tokens_per_s']:.2f} | {s['llama_cpp_tokens_per_s']:.2f} | "
                  f"{s['jambatrt_peak_rss_bytes'] / gb:.2f} | {s['llama_cpp_peak_rss_bytes'] / gb:.2f} |")
    if flat:
        ctx = [r["context"] for r in flat[0]["rows"]]
        md += ["", f"## jambatrt decode per token against context (KV cache {meta['kv_cache']})", "",
               f"Median ms a token, and in brackets the median over {flat[0]['steps']} rounds of its ratio to the "
               f"shortest context's step in the same round; flat = every ratio within {FLAT_WITHIN}. Floor: the ratio "
               f"if a longer context cost only its extra KV cache bytes at the speed of a plain read of them, "
               f"measured in the same rounds (validate/decode_flat.py).", "",
               "| precision | " + " | ".join(f"{c:,}" for c in ctx) + " | flat | floor |",
               "|---|" + "---|" * (len(ctx) + 2)]
        for f in flat:
            w = next(r for r in f["rows"] if r["context"] == f["worst_context"])
            md.append(f"| {f['precision']} | " + " | ".join(f"{r['decode_ms_median']:.2f} (x{r['ratio_to_shortest_median']:.2f})"
                                                             for r in f["rows"]) +
                      f" | {'yes' if f['flat'] else 'no'} (worst x{f['worst_median_ratio']:.2f}) | "
                      f"x{f['floor_at_worst']:.2f} (at {w['context']:,}: {w['kv_bytes'] / 1e6:.1f} MB of KV cache read "
                      f"in {w['kv_read_ms_median']:.2f} ms) |")
    md += ["", "## Logits (last prompt position)", "", "| precision | ours | tokens | max abs diff | rel. | top-1 equal | top-5 overlap |",
           "|---|---|---|---|---|---|---|"]
    for lg in logits:
        md.append(f"| {lg['precision']} | {lg['ours']} | {lg['tokens']} | {lg['max_abs_diff']:.3e} | "
                  f"{lg['relative_max_diff']:.2e} | {lg['top1_equal']} | {lg['top5_overlap']:.1f} |")
    md += ["", "## Semantic differences", ""] + [f"- {s}" for s in SEMANTICS]
    (out / "peer.md").write_text("\n".join(md) + "\n")
    _plot(out / "peer.png", summary, flat)


def _plot(path: Path, summary: list[dict], flat: list[dict] = ()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3 if flat else 2, figsize=(16 if flat else 11, 4))
    if flat:
        ax = axes[2]
        for f, marker in zip(flat, ("o", "s")):
            line, = ax.plot([r["context"] for r in f["rows"]], [r["ratio_to_shortest_median"] for r in f["rows"]],
                            marker=marker, label=f"{f['precision']} weights")
            ax.plot([r["context"] for r in f["rows"]], [r["floor_ratio_median"] for r in f["rows"]], ls=":",
                    color=line.get_color(), label=f"{f['precision']}: floor (KV cache read plainly)")
        ax.axhline(FLAT_WITHIN, ls="--", color="red", lw=1, label=f"flat within {FLAT_WITHIN}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context")
        ax.set_ylabel("decode time / at the shortest context")
        ax.set_title("jambatrt decode against context")
        ax.legend(fontsize=8)
    for ax, mode in zip(axes[:2], ("prefill", "decode")):
        for prec, marker in (("float32", "o"), ("int8", "s")):
            pts = [(s["length"], s["median_ratio"], s["ratios"]) for s in summary
                   if s["mode"] == mode and s["precision"] == prec]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker=marker, label=f"{prec} (median)")
            for x, _, rs in pts:
                ax.scatter([x] * len(rs), rs, s=10, color="gray", alpha=0.6)
        ax.axhline(TARGET, ls="--", color="red", lw=1, label=f"target {TARGET}x")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefill length" if mode == "prefill" else "context before decode")
        ax.set_ylabel("jambatrt / llama.cpp tok/s")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/peer")
    p.add_argument("--cache", default="build/peer", help="llama.cpp build, checkpoint, GGUFs, artifacts (kept)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds, the report taking the median of the per-round ratios (on a shared 2-core VM "
                        "one build's per-round ratio ranged 0.87-2.28, and medians of 3-4 rounds differed by up to 0.3)")
    p.add_argument("--lengths", default="512,4096,16384", help="prefill and decode-after lengths")
    p.add_argument("--prefill-lengths", default=None,
                   help="compare prefill only at these (a subset of --lengths; default: all of them)")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--no-logits", action="store_true")
    p.add_argument("--flat-contexts", default="1024,4096,16384,65536",
                   help="contexts of the decode-per-token-against-context test ('' skips it)")
    p.add_argument("--flat-steps", type=int, default=32, help="decode steps at each of --flat-contexts")
    p.add_argument("--kv-cache", default="float32", choices=sorted(KV_CACHES),
                   help="both engines' KV cache: float32 (jambatrt float32, llama.cpp its default f16) or int8 "
                        "(jambatrt --kv-cache int8, llama.cpp q8_0 K and V with flash attention)")
    a = p.parse_args(argv)
    out, cache = Path(a.out), Path(a.cache)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in a.lengths.split(",")]
    prefill_lengths = None if a.prefill_lengths is None else [int(x) for x in a.prefill_lengths.split(",")]
    if prefill_lengths is not None and not set(prefill_lengths) <= set(lengths):
        raise SystemExit(f"--prefill-lengths {a.prefill_lengths} must be a subset of --lengths {a.lengths}")
    bins, vendored, version = llama_cpp(cache)
    ckpt = checkpoint(cache)
    ggufs = gguf(cache, bins, vendored, ckpt)
    arts = artifacts(cache, ckpt, a.kv_cache)
    logits = [] if a.no_logits else logits_check(bins, ggufs, arts, ckpt, out)
    if logits:
        _log("logits: " + json.dumps(logits))
    flat_contexts = sorted(int(x) for x in a.flat_contexts.split(",") if x.strip())
    flat = flat_decode(arts, flat_contexts, a.flat_steps, out) if flat_contexts else []
    rows = run_rounds(bins, ggufs, arts, lengths, a.rounds, a.decode_tokens, a.threads, out, prefill_lengths,
                      a.kv_cache)
    meta = {"llama_cpp": f"llama-cpp-python {version} sdist, vendored llama.cpp", "threads": a.threads,
            "kv_cache": a.kv_cache,
            "rounds": a.rounds, "lengths": lengths, "prefill_lengths": prefill_lengths or lengths, "decode_tokens": a.decode_tokens,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "artifacts": {k: str(v) for k, v in arts.items()}, "gguf": {k: str(v) for k, v in ggufs.items()}}
    summary = summarise(rows)
    write_report(out, summary, rows, logits, meta, flat)
    print((out / "peer.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
