"""Reports: the JSON DESIGN.md fixes, a markdown summary naming versions, machine, model and
tolerances, and PNG plots (matplotlib, Agg backend: no display needed) beside the JSON.

Parity:  REPORT.json, REPORT.md, REPORT.error.png (max/mean |diff| vs length),
         REPORT.top1.png (top-1 agreement vs length).
Profile: REPORT.json, REPORT.md and a PNG (tokens/s and peak RSS vs length)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

from jambatrt.artifact import library_versions


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    mem = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "usable_cpus": usable, "processor": cpu, "memory_bytes": mem}


def _model_info(manifest: dict | None) -> dict | None:
    if not manifest:
        return None
    return {"source": manifest.get("source"), "dtype": manifest.get("dtype"),
            "quantization": manifest.get("quantization"), "config": manifest.get("config")}


def _setting_lines(r: dict) -> list[str]:
    """The machine and library versions a report was measured with."""
    return [_machine_line(r["machine"]), "- versions: " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())]


def _machine_line(m: dict) -> str:
    mem = f", {m['memory_bytes'] / (1 << 30):.0f} GiB RAM" if m.get("memory_bytes") else ""
    return (f"- machine: {m.get('processor', '?')}, {m['cpus']} CPUs ({m.get('usable_cpus', m['cpus'])} usable){mem}; "
            f"{m['platform']}, Python {m['python']}")


def _model_line(r: dict) -> str:
    model = r.get("model") or {}
    src = model.get("source") or {}
    cfg = model.get("config") or {}
    name = f"preset {src['preset']}" if src.get("preset") else f"checkpoint {src.get('checkpoint', '?')}"
    dims = (f" (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']})"
            if cfg.get("hidden_size") else "")
    return (f"- model: {name}{dims}, dtype {r.get('dtype', model.get('dtype', '?'))}, experts "
            f"{(model.get('quantization') or {}).get('experts', '?')}, batch {r.get('batch', 1)}")


def check_report_paths(paths: list[Path], what: str = "--report") -> None:
    """Before a long run: every report file can be created where asked (not a directory, the
    folder exists or can be made, the file system takes a file there), so a bad --report/--plot
    is one InputError now rather than an OSError after the run. Touches nothing that stays."""
    from jambatrt.errors import InputError
    paths = [Path(p) for p in paths]
    same = {p for p in paths if paths.count(p) > 1 or any(p.resolve() == q.resolve() for q in paths if q is not p)}
    if same:
        raise InputError(f"{what}: {', '.join(map(str, sorted(same)))} named for two report files (give distinct paths)")
    for p in paths:
        if p.is_dir():
            raise InputError(f"{what} {p}: is a directory (accepted: a file path, e.g. {p / 'report.json'})")
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent           # the folder is made at write time; its nearest ancestor must take it
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{p.name}.probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"{what} {p}: cannot write there ({e.strerror or e})") from None


def _write_all(groups: list[tuple[list[Path], Callable[[list[Path]], None]]]) -> None:
    """Write a report's files as a set: each group's writer fills temp files beside its paths (one
    writer may draw several files), then all are renamed into place. On any failure the temps and
    any file already renamed are removed: never half a report."""
    temps: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for paths, write in groups:
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
                os.close(fd)
                temps[path] = Path(tmp)
            write([temps[p] for p in paths])
        for path, tmp in temps.items():
            os.chmod(tmp, 0o666 & ~_umask())           # mkstemp makes 0600; a report is shared like any file
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for path in done:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_writer(obj):
    return lambda tmps: tmps[0].write_text(json.dumps(obj, indent=2) + "\n")


def _text_writer(text: str):
    return lambda tmps: tmps[0].write_text(text)


def _with_context(report: dict, artifact_manifest: dict | None) -> dict:
    """The report with machine, versions and model added."""
    report = {**report, "machine": machine(), "versions": library_versions()}
    if artifact_manifest:
        report["model"] = _model_info(artifact_manifest)
    return report


# ---- parity ------------------------------------------------------------------------------------
def parity_report_paths(path: str | Path, plots: bool = True) -> list[Path]:
    """JSON, markdown beside it, and (with plots) the PNGs of parity_plot_paths."""
    path = Path(path)
    return [path, path.with_suffix(".md")] + (parity_plot_paths(path) if plots else [])


def write_parity(report: dict, path: str | Path, artifact_manifest: dict | None = None,
                 plots: bool = True) -> tuple[Path, Path]:
    """Write report JSON to `path`, a markdown summary beside it (same stem, .md) and, with
    `plots`, the PNGs of `parity_plot_paths(path)` -- all or none of them."""
    path = Path(path)
    report = _with_context(report, artifact_manifest)
    groups = [([path], _json_writer(report)), ([path.with_suffix(".md")], _text_writer(parity_markdown(report)))]
    if plots and report["results"]:
        groups.append((parity_plot_paths(path), lambda tmps: plot_parity(report, path, out=tmps)))
    _write_all(groups)
    return path, path.with_suffix(".md")


def parity_plot_paths(path: str | Path) -> list[Path]:
    path = Path(path)
    return [path.with_suffix(".error.png"), path.with_suffix(".top1.png")]


def parity_markdown(r: dict) -> str:
    tol = r.get("tolerances", {})
    stol = r.get("state_tolerances") or {}
    lines = [f"# Parity: {r['backend']} engine vs {r['reference']} reference — "
             f"{'PASSED' if r['passed'] else 'FAILED'}", "",
             _model_line(r),
             f"- tolerances: logits atol {tol.get('atol')}, rtol {tol.get('rtol')}, top-1 agreement >= {tol.get('top1')}"
             + (f"; tokens whose MoE routing margin is < {tol['router_margin']} are graded apart (undecided top-k)"
                if tol.get("router_margin") is not None else "")
             + (f"; states (present.*) atol {stol.get('atol')}, rtol {stol.get('rtol')}" if stol else
                "; states not compared"),
             *_setting_lines(r), "",
             "| length | max abs err | mean abs err | top-1 agreement | worst state err | engine s | reference s "
             "| reference | passed |",
             "|---:|---:|---:|---:|---:|---:|---:|:---|:---:|"]
    for x in r["results"]:
        s = x.get("seconds", {})
        states = x.get("states") or {}
        worst = max((v.get("max_abs_err", float("nan")) for v in states.values()), default=None)
        lines.append(f"| {x['length']:,} | {x['max_abs_err']:.3e} | {x['mean_abs_err']:.3e} | {x['top1_agreement']:.4f} "
                     f"| {'—' if worst is None else f'{worst:.3e}'} "
                     f"| {s.get('engine', float('nan')):.3f} | {s.get('reference', float('nan')):.3f} "
                     f"| {x.get('reference_impl') or r['reference']} | {'yes' if x['passed'] else 'NO'} |")
    lines += ["", "## Numerical health", ""]
    for x in r["results"]:
        h = x.get("health") or {}
        if not h:
            continue
        if h.get("problem"):
            first = h.get("first_bad_layer")
            lines.append(f"- length {x['length']:,}: " + (f"**first bad layer {first}**: " if first is not None else "")
                         + f"{h['problem']} — look at {h['where']}")
        else:
            lines.append(f"- length {x['length']:,}: no NaN/Inf; every layer's state within tolerance")
        ties = x.get("argmax_ties") or {}
        if ties.get("tied_positions"):
            lines.append(f"  - {ties['tied_positions']} position(s) where the reference's top-two logits are closer than "
                         f"the logits tolerance (argmax ties, graded apart); {ties['flipped']} picked the other token"
                         + (f" at [batch, position] {ties['positions']} (reference margins "
                            f"{', '.join(f'{m:.2e}' for m in ties['flipped_margins'])})" if ties.get("flipped") else ""))
        rt = x.get("routing") or {}
        if rt.get("undecided_tokens"):
            where = ", ".join(f"layer {k}: {v}" for k, v in rt.get("undecided_by_layer", {}).items() if v)
            lines.append(f"  - {rt['undecided_tokens']} token(s) with an undecided MoE top-k (routing margin < "
                         f"{rt['margin_threshold']}; {where}; [batch, position] {rt.get('tokens')}) graded apart: "
                         f"their logits max |diff| {rt.get('max_abs_err_undecided', float('nan')):.3e}")
    worst = next((x for x in r["results"] if (x.get("health") or {}).get("problem")), None) or \
        (r["results"][-1] if r["results"] else None)
    if worst and (worst.get("health") or {}).get("layers"):
        lines += ["", f"Per layer at length {worst['length']:,}:", "",
                  "| layer | kind | reference NaN/Inf | reference max abs | state | max abs err | state passed |",
                  "|---:|:---|---:|---:|:---|---:|:---:|"]
        for layer in worst["health"]["layers"]:
            names = layer["states"] or {"—": None}
            for n, st in names.items():
                err = "—" if not st or "max_abs_err" not in st else f"{st['max_abs_err']:.3e}"
                ok = "—" if not st else ("yes" if st["passed"] else "NO")
                ref_max = layer.get("reference_max_abs")
                lines.append(f"| {layer['layer']} | {layer.get('kind', '')} | {layer.get('reference_nonfinite', '—')} "
                             f"| {'—' if ref_max is None else f'{ref_max:.3e}'} | {n} | {err} | {ok} |")
    if r.get("mismatches"):
        lines += ["", "## Mismatches", ""] + [f"- {m}" for m in r["mismatches"]]
    lines += ["", "Plots beside this file (same stem): `.error.png` (error vs length), `.top1.png` (top-1 vs length)."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _length_axis(ax, lengths: list[int]) -> None:
    """Log x (base 2) with a labelled tick at every measured length."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{n:,}" for n in lengths], rotation=30, ha="right")
    ax.minorticks_off()
    lo, hi = min(lengths), max(lengths)
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xlabel("sequence length (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def plot_parity(report: dict, path: str | Path, out: list[Path] | None = None) -> list[Path]:
    """Error vs length and top-1 agreement vs length (log x), one PNG each, beside `path` (or at `out`)."""
    plt = _pyplot()
    res = sorted(report["results"], key=lambda x: x["length"])
    out = out or parity_plot_paths(path)
    if not res:
        return []
    L = [x["length"] for x in res]
    tol = report.get("tolerances", {})
    title = f"{report['backend']} engine vs {report['reference']} reference ({report.get('dtype', '')})"
    floor = 1e-12           # an exact match (0.0) still shows on a log axis

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(L, [max(x["max_abs_err"], floor) for x in res], "o-", label="logits max |diff|")
    ax.plot(L, [max(x["mean_abs_err"], floor) for x in res], "s--", label="logits mean |diff|")
    worst_state = [max((s.get("max_abs_err", 0.0) for s in (x.get("states") or {}).values()), default=None) for x in res]
    if any(w is not None for w in worst_state):
        ax.plot([n for n, w in zip(L, worst_state) if w is not None],
                [max(w, floor) for w in worst_state if w is not None], "^:", label="worst state max |diff|")
    undecided = [x for x in res if (x.get("routing") or {}).get("max_abs_err_undecided") is not None]
    if undecided:
        ax.plot([x["length"] for x in undecided],
                [max(x["routing"]["max_abs_err_undecided"], floor) for x in undecided], "x", color="grey", ms=8,
                ls="none", label="tokens with undecided MoE top-k (graded apart)")
    if tol.get("atol"):
        ax.axhline(tol["atol"], color="red", lw=1, ls="--", label=f"logits atol {tol['atol']}")
    failed = [x for x in res if not x["passed"]]
    if failed:
        ax.plot([x["length"] for x in failed], [max(x["max_abs_err"], floor) for x in failed], "rx", ms=12, mew=2,
                ls="none", label="failed")
    ax.set_yscale("log")
    ax.set_ylabel("absolute error")
    _length_axis(ax, L)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out[0], format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(L, [x["top1_agreement"] for x in res], "o-", label="top-1 agreement")
    if tol.get("top1") is not None:
        ax.axhline(tol["top1"], color="red", lw=1, ls="--", label=f"required {tol['top1']}")
    lo = min([x["top1_agreement"] for x in res] + [tol.get("top1", 1.0)])
    ax.set_ylim(min(lo - 0.01, 0.99), 1.002)
    ax.set_ylabel("argmax agreement (fraction of positions)")
    _length_axis(ax, L)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out[1], format="png")
    plt.close(fig)
    return out


# ---- profile -----------------------------------------------------------------------------------
def write_profile(report: dict, path: str | Path, artifact_manifest: dict | None = None,
                  plot: str | Path | None = None) -> tuple[Path, Path, Path]:
    """Profile JSON at `path`, markdown beside it, PNG at `plot` (default: beside it, .png): all or none."""
    path, md, png = profile_report_paths(path, plot)
    report = _with_context(report, artifact_manifest)
    _write_all([([path], _json_writer(report)), ([md], _text_writer(profile_markdown(report))),
                ([png], lambda tmps: plot_profile(report, tmps[0]))])
    return path, md, png


def profile_report_paths(path: str | Path, plot: str | Path | None = None) -> list[Path]:
    path = Path(path)
    return [path, path.with_suffix(".md"), Path(plot) if plot else path.with_suffix(".png")]


def _gb(n) -> str:
    return "—" if n is None else f"{n / 1e9:.2f}"


def _tps(v) -> str:
    return "—" if v is None else f"{v:,.1f}"


def profile_markdown(r: dict) -> str:
    st = r.get("settings", {})
    lines = [f"# Profile: {r['backend']} engine vs {r.get('reference') or 'no'} reference", "",
             _model_line(r),
             f"- reference: {r.get('reference_description') or r.get('reference') or 'none'}"
             + ("; CPU implementations: " + ", ".join(f"{k}: {v}" for k, v in r["reference_kernels"].items())
                if r.get("reference_kernels") else ""),
             f"- engine: {r['backend']}, prefill in chunks of {r.get('engine_chunk')} tokens, state carried",
             f"- method: each (side, length) in a fresh child process; warm-up: a prefill of "
             f"{st.get('warmup_tokens')} tokens and {st.get('decode_warmup')} decode steps (untimed); prefill timed "
             f"{st.get('repeats')} times (fewer once {st.get('budget_s')} s are spent); decode: "
             f"{st.get('decode_tokens')} steps after the timed prefill, each timed; tokens/s = median; "
             "peak RSS = the child's VmHWM (prefill: whole run; decode: reset before decoding) and its "
             "wait4 ru_maxrss",
             *_setting_lines(r), "",
             "| length | mode | tokens/s (median) | min | max | runs | peak RSS GB | reference tokens/s "
             "| reference peak RSS GB |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["results"]:
        lines.append(f"| {x['length']:,} | {x['mode']} | {_tps(x['tokens_per_s'])} | {_tps(x.get('tokens_per_s_min'))} "
                     f"| {_tps(x.get('tokens_per_s_max'))} | {x.get('runs', '—')} | {_gb(x['peak_rss_bytes'])} "
                     f"| {_tps(x.get('reference_tokens_per_s'))} | {_gb(x.get('reference_peak_rss_bytes'))} |")
    notes = [f"- length {x['length']:,} {x['mode']}: {x['reference_note']}" for x in r["results"] if x.get("reference_note")]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def plot_profile(report: dict, png: str | Path) -> Path:
    """Tokens/s vs length and peak RSS vs length (log x), prefill and decode, engine and reference."""
    plt = _pyplot()
    res = report["results"]
    L = sorted({x["length"] for x in res})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    styles = {"prefill": "o", "decode": "s"}
    for mode in ("prefill", "decode"):
        rows = sorted((x for x in res if x["mode"] == mode), key=lambda x: x["length"])
        if not rows:
            continue
        m = styles[mode]
        xs = [x["length"] for x in rows]
        line, = a1.plot(xs, [x["tokens_per_s"] for x in rows], m + "-", label=f"{report['backend']} {mode} (min-max band)")
        a1.fill_between(xs, [x.get("tokens_per_s_min") or x["tokens_per_s"] for x in rows],
                        [x.get("tokens_per_s_max") or x["tokens_per_s"] for x in rows], alpha=0.15,
                        color=line.get_color())
        ref = [x for x in rows if x.get("reference_tokens_per_s")]
        if ref:
            line, = a1.plot([x["length"] for x in ref], [x["reference_tokens_per_s"] for x in ref], m + "--",
                            label=f"{report.get('reference') or 'reference'} {mode}")
            a1.fill_between([x["length"] for x in ref],
                            [x.get("reference_tokens_per_s_min") or x["reference_tokens_per_s"] for x in ref],
                            [x.get("reference_tokens_per_s_max") or x["reference_tokens_per_s"] for x in ref],
                            alpha=0.15, color=line.get_color())
        a2.plot(xs, [x["peak_rss_bytes"] / 1e9 for x in rows], m + "-", label=f"{report['backend']} {mode}")
        ref_mem = [(x["length"], x["reference_peak_rss_bytes"] / 1e9) for x in rows if x.get("reference_peak_rss_bytes")]
        if ref_mem:
            a2.plot(*zip(*ref_mem), m + "--", label=f"{report.get('reference') or 'reference'} {mode}")
    a1.set_yscale("log")
    a1.set_ylabel("tokens / s")
    a1.set_title("throughput", fontsize=10)
    a2.set_ylabel("peak RSS (GB)")
    peaks = [x[k] for x in res for k in ("peak_rss_bytes", "reference_peak_rss_bytes") if x.get(k)]
    a2.set_ylim(0, max(peaks) / 1e9 * 1.15 if peaks else 1)
    a2.set_title("peak memory (child process)", fontsize=10)
    for ax in (a1, a2):
        _length_axis(ax, L)
        ax.legend(fontsize=8)
    src = ((report.get("model") or {}).get("source") or {})
    fig.suptitle(f"jambatrt profile: {src.get('preset') or src.get('checkpoint') or ''} "
                 f"({report['machine'].get('processor', '')}, {report['machine']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, format="png")
    plt.close(fig)
    return Path(png)


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
