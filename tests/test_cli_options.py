"""Every numeric command-line option is parsed with its range (cli.py), and bad values, unwritable
report paths and file-system refusals end in one `error: <Type>: ...` line with exit code 2,
never a traceback and never half a report (issue 15, item 8); a seeded fuzz over every numeric
option of every command."""

import argparse
import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from jambatrt import cli


def _run(argv, capsys):
    """cli.main in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:          # the parser's own exit (--help, a UsageError)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _numeric_options():
    """(command, option, action) for every option of every subcommand that takes a number."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        for act in p._actions:
            numeric_default = isinstance(act.default, (int, float)) and not isinstance(act.default, bool)
            if act.option_strings and (numeric_default or hasattr(act.type, "range") or act.type in (int, float)):
                out.append((name, act.option_strings[-1], act))
    return out


def test_every_numeric_option_has_a_ranged_type():
    opts = _numeric_options()
    assert len(opts) >= 30
    bare = [f"{c} {o}" for c, o, act in opts if not hasattr(act.type, "range")]
    assert bare == [], f"numeric options without a ranged type: {bare}"


@pytest.fixture(scope="module")
def built(tiny_artifact):
    run_cli("build", tiny_artifact, "--backend", "ort", check=True)
    return tiny_artifact


# ---- the cases issue 15 lists ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["generate", "{a}", "--backend", "ort", "--prompt-ids", "100000000000000000000"], "--prompt-ids"),
    (["generate", "{a}", "--backend", "ort", "--prompt-ids", "1", "--temperature", "nan"], "--temperature"),
    (["generate", "{a}", "--backend", "ort", "--prompt-ids", "1", "--seed", "-1"], "--seed"),
    (["validate", "{a}", "--backend", "ort", "--seed", "-1"], "--seed"),
    (["validate", "{a}", "--backend", "ort", "--batch", "-2"], "--batch"),
    (["inspect", "--preset", "tiny", "--context", str(10 ** 18)], "--context"),
    (["inspect", "--preset", "tiny", "--batch", "-3"], "--batch"),
    (["profile", "{a}", "--backend", "ort", "--batch", "0"], "--batch"),
    (["profile", "{a}", "--backend", "ort", "--decode-tokens", "0"], "--decode-tokens"),
    (["profile", "{a}", "--backend", "ort", "--repeats", "-5"], "--repeats"),
    (["profile", "{a}", "--backend", "ort", "--warmup-tokens", "-1"], "--warmup-tokens"),
    (["profile", "{a}", "--backend", "ort", "--timeout", "0"], "--timeout"),
    (["profile", "{a}", "--backend", "ort", "--budget-s", "nan"], "--budget-s"),
    (["build", "{a}", "--backend", "aoti", "--prefill-chunk", "-1"], "--prefill-chunk"),
])
def test_listed_option_values_are_one_line_usage_errors(built, capsys, argv, needle):
    rc, out, err = _run([x.format(a=built) for x in argv], capsys)
    _one_line_error(rc, err, "UsageError", needle)


def test_the_real_command_line_prints_one_line(built):
    p = run_cli("generate", built, "--backend", "ort", "--prompt-ids", "100000000000000000000")
    _one_line_error(p.returncode, p.stderr, "UsageError", "--prompt-ids")


def test_lengths_beyond_the_engine_or_memory_are_refused_before_allocating(built, capsys):
    rc, _, err = _run(["validate", built, "--backend", "ort", "--lengths", "300000"], capsys)
    _one_line_error(rc, err, "InputError", "maximum context 262,144")
    rc, _, err = _run(["validate", built, "--backend", "ort", "--lengths", "200000", "--batch", "100000"], capsys)
    _one_line_error(rc, err, "InputError", "GB for the logits alone")
    rc, _, err = _run(["generate", built, "--backend", "ort", "--prompt-ids", "1", "--max-new-tokens", "2147483647"],
                      capsys)
    _one_line_error(rc, err, "InputError", "exceeds the maximum context")


# ---- report paths and file systems that refuse ----------------------------------------------------------
def test_unwritable_report_paths_fail_before_the_run_and_leave_nothing(built, tmp_path, capsys):
    rc, _, err = _run(["validate", built, "--backend", "ort", "--lengths", "3", "--report", "/proc/r.json"], capsys)
    _one_line_error(rc, err, "InputError", "/proc/r.json", "cannot write there")
    rc, _, err = _run(["validate", built, "--backend", "ort", "--lengths", "3", "--report", tmp_path], capsys)
    _one_line_error(rc, err, "InputError", "is a directory")
    rep = tmp_path / "prof" / "p.json"
    rc, _, err = _run(["profile", built, "--backend", "ort", "--lengths", "3", "--report", rep,
                       "--plot", "/proc/x.png"], capsys)
    _one_line_error(rc, err, "InputError", "/proc/x.png")
    assert not (tmp_path / "prof").exists()                  # no half report: not even the JSON


def test_a_plot_that_fails_at_write_time_leaves_no_half_report(tmp_path, monkeypatch):
    """The files of one report are written as a set: when the last (the plot) fails, the JSON and
    markdown already drawn are not left behind either."""
    from jambatrt.validate import report as rp

    def broken_plot(report, png):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(rp, "plot_profile", broken_plot)
    res = {"backend": "ort", "results": [{"length": 1, "mode": "prefill", "backend": "ort", "tokens_per_s": 1.0,
                                          "tokens_per_s_min": 1.0, "tokens_per_s_max": 1.0, "runs": 1, "peak_rss_bytes": 1,
                        "reference_tokens_per_s": None}]}
    with pytest.raises(OSError, match="No space"):
        rp.write_profile(res, tmp_path / "p.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["deploy", "{a}", "--repository", "/sys/jambatrt-repo"],        # sysfs: refuses new files
    ["deploy", "{a}", "--repository", "/proc/jambatrt-repo"],
    ["export", "--preset", "tiny", "-o", "/sys/jambatrt-out"],
])
def test_file_systems_that_refuse_writes_are_one_line_errors(built, capsys, argv):
    rc, _, err = _run([x.format(a=built) for x in argv], capsys)
    _one_line_error(rc, err)


def test_symlink_loop_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    rc, _, err = _run(["export", tmp_path / "a", "-o", tmp_path / "out"], capsys)
    _one_line_error(rc, err)
    assert not (tmp_path / "out").exists()


# ---- fuzz: random values for every numeric option ------------------------------------------------------
def _random_value(rng: random.Random) -> str:
    special = ["nan", "-nan", "inf", "-inf", "1e309", "-1e309", "0", "-0", "+7", "1.5", "-1", "1e3", "0x10", "1_000",
               "", " ", "\u0663", "9" * 40, "-" + "9" * 40, "1e-320", "abc", "1,2", "--", "NaN", "Infinity", "2147483648",
               "2147483647", "9223372036854775808", "65536", "65535", "1;2", "0.0"]
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(special)
    if kind < 0.8:
        return str(rng.choice([-1, 1]) * rng.randrange(0, 10 ** rng.randrange(1, 26)))
    return repr(rng.choice([-1, 1]) * rng.random() * 10 ** rng.randrange(-310, 310))


def test_fuzz_every_numeric_option_parses_to_range_or_one_line_error(capsys):
    """600 seeded random values over every numeric option of every command: either the parser
    accepts it (and the value lies in the option's range) or it is one `error: UsageError` line,
    exit code 2; never a traceback. Only the parser runs here (a valid --max-seq would export)."""
    rng = random.Random(15)
    opts = _numeric_options()
    positional = {"export": ["--preset", "tiny", "-o", "/nonexistent/out"], "plugins": ["-o", "/nonexistent/p"],
                  "deploy": ["A", "--repository", "/nonexistent/r"], "inspect": ["--preset", "tiny"],
                  "generate": ["A", "--backend", "ort", "--prompt-ids", "1"]}
    counts = {"accepted": 0, "refused": 0}
    parser = cli.build_parser()
    for i in range(600):
        cmd, opt, act = opts[i % len(opts)]
        value = _random_value(rng)
        base = positional.get(cmd, ["A", "--backend", "ort"])
        argv = [cmd, *[x for x in base if x != opt], f"{opt}={value}"]
        if opt == "--prompt-ids":
            argv = [cmd, "A", "--backend", "ort", f"--prompt-ids={value}"]
        capsys.readouterr()
        try:
            ns = parser.parse_args(argv)
        except SystemExit as e:
            _, err = capsys.readouterr()
            _one_line_error(e.code, err, "UsageError", opt)
            counts["refused"] += 1
            continue
        got = getattr(ns, act.dest)
        lo, hi = act.type.range
        flat = [v for p in got for v in (p if isinstance(p, list) else [p])] if isinstance(got, list) else [got]
        assert flat and all(lo <= v <= hi for v in flat), (" ".join(map(repr, argv)), got)
        counts["accepted"] += 1
    print(f"\n[cli fuzz] {sum(counts.values())} option values over {len(opts)} options: {counts}")
    assert counts["accepted"] > 50 and counts["refused"] > 300


def test_fuzz_cheap_commands_run_with_random_accepted_values(built, tmp_path, capsys):
    """Random values the parser accepts, run for real where that is cheap (inspect, generate's
    sampling options, validate's seed, deploy without --serve): success or one error line."""
    rng = random.Random(16)

    def val(lo, hi):
        return str(rng.choice([lo, hi, rng.randint(lo, min(hi, lo + 10)), rng.randint(lo, hi)]))

    cases = []
    for _ in range(12):
        cases.append(["inspect", "--preset", rng.choice(["tiny", "jamba-1.5-large"]), "--context", val(1, 2 ** 31 - 1),
                      "--batch", val(1, 2 ** 31 - 1), "--json"])
        cases.append(["inspect", built, "--context", val(1, 2 ** 31 - 1)])
    for _ in range(10):
        cases.append(["generate", built, "--backend", "ort", "--max-new-tokens", "2", "--json",
                      "--prompt-ids", ";".join(",".join(val(0, 600) for _ in range(rng.randint(1, 3)))
                                               for _ in range(rng.randint(1, 2))),
                      "--temperature", rng.choice(["0", "1e-300", "0.7", "1e6", str(rng.random() * 5)]),
                      "--top-p", rng.choice(["1", "1e-300", "0.5", str(rng.random() or 1.0)]),
                      "--seed", val(0, 2 ** 63 - 1), "--eos-id", val(0, 2 ** 63 - 1)])
    for _ in range(3):
        cases.append(["validate", built, "--backend", "ort", "--lengths", "1,2", "--seed", val(0, 2 ** 63 - 1),
                      "--no-state", "--report", tmp_path / "v.json"])
    for i in range(6):
        cases.append(["deploy", built, "--repository", tmp_path / f"repo{i}", "--max-tokens", val(1, 2 ** 31 - 1),
                      "--max-sequences", val(1, 1 << 20), "--instances", val(1, 1024),
                      "--idle-seconds", rng.choice(["1e-300", "0.5", "31536000", str(rng.random() * 100 + 1e-9)])])
    outcomes = {}
    for argv in cases:
        rc, out, err = _run(argv, capsys)
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        if rc == 0:
            outcomes["ok"] = outcomes.get("ok", 0) + 1
            if argv[0] == "generate":
                rows = json.loads(out)
                assert all(len(r["generated_ids"]) == 2 for r in (rows if isinstance(rows, list) else [rows]))
        else:
            _one_line_error(rc, err)
            outcomes[err.split(":")[1].strip()] = outcomes.get(err.split(":")[1].strip(), 0) + 1
    print(f"\n[cli fuzz, run] {len(cases)} commands: {outcomes}")
    assert outcomes.get("ok", 0) >= 10
    shutil.rmtree(tmp_path, ignore_errors=True)
