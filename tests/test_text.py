"""Text in, text out (issue 17): the tokenizer, chat template and generation config of a checkpoint in
the artifact; `generate --prompt/--chat/--chat-file` against transformers' generate + decode and
apply_chat_template on the same checkpoint; several EOS ids; bad text input; the published presets."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import hf_model
from jambatrt import cli
from jambatrt.artifact import read_manifest
from jambatrt.config import PRESETS, PUBLISHED_PARAMS, preset
from jambatrt.export.checkpoint import write_preset
from jambatrt.export.tokenizer import EOM, build_tokenizer, special_ids

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[test]')")

PROMPT = "kato mira nesu lope. Chira ka"
N = 32


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny checkpoint with its tokenizer (seed 3: a different model from the other modules')."""
    return write_preset("tiny", tmp_path_factory.mktemp("text-ckpt") / "tiny", seed=3)


def _export_and_build(ckpt, out):
    """`jambatrt export CKPT -o OUT` and `build OUT --backend ort` (the CLI in this process: a child
    process per call costs more than the call on a busy 2-core machine)."""
    assert cli.main(["export", str(ckpt), "-o", str(out)]) == 0
    assert cli.main(["build", str(out), "--backend", "ort"]) == 0
    return out


@pytest.fixture(scope="module")
def text_artifact(text_ckpt, tmp_path_factory):
    return _export_and_build(text_ckpt, tmp_path_factory.mktemp("text-art") / "tiny")


@pytest.fixture(scope="module")
def hf_tok(text_ckpt):
    return transformers.AutoTokenizer.from_pretrained(str(text_ckpt), local_files_only=True)


def _cli_json(capsys, *args):
    capsys.readouterr()
    assert cli.main(["generate", *map(str, args), "--backend", "ort", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _cli(capsys, *args):
    """`jambatrt ARGS` in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the tokenizer made for presets ------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [200, 256, 301, 512, 1024])
def test_preset_tokenizer_has_the_config_vocabulary(vocab):
    gen = {"eos_token_id": [2, 518]} if vocab > 518 else {"eos_token_id": [2, 7]}
    tok = build_tokenizer(vocab, gen)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    assert sorted(tok.get_vocab().values()) == list(range(vocab))             # every id used, none twice
    assert tok.token_to_id(EOM) == gen["eos_token_id"][1] == special_ids(gen)[EOM]
    ids = tok.encode("kato mira, héllo 9!").ids
    assert ids[0] == 1 and max(ids) < vocab                                   # BOS, then in range
    if vocab >= 512:                                                          # byte fallback: any text round-trips
        assert tok.decode(tok.encode("héllo 日本 x").ids) == "héllo 日本 x"


def test_export_carries_tokenizer_files_listed_and_hashed(text_artifact, text_ckpt, capsys):
    m = read_manifest(text_artifact)
    text = m["text"]
    assert text["tokenizer"] and text["chat_template"] and text["eos_token_ids"] == [2, 7]
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert f in text["files"] and f in m["files"] and m["files"][f]["bytes"] == (text_artifact / f).stat().st_size
        assert (text_artifact / f).read_bytes() == (text_ckpt / f).read_bytes()
    # hashed like every file: an edited tokenizer is refused before anything runs
    bad = text_artifact.parent / "edited"
    shutil.copytree(text_artifact, bad)
    edited = (bad / "tokenizer.json").read_text().replace("<|eom|>", "<|eon|>")       # same size, other bytes
    assert edited != (text_artifact / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(edited)
    rc, _, err = _cli(capsys, "generate", bad, "--backend", "ort", "--prompt", "x")
    assert rc == 2 and "tokenizer.json" in err and err.count("\n") == 1, err


def test_checkpoint_without_tokenizer_exports_and_says_so(tmp_path, capsys):
    ckpt = write_preset("tiny", tmp_path / "ckpt", tokenizer=False)
    out = _export_and_build(ckpt, tmp_path / "art")
    m = read_manifest(out)
    assert m["text"] == {"files": [], "tokenizer": False, "chat_template": False, "eos_token_ids": [2]}
    for opt in (["--prompt", "hello"], ["--chat", "hello"]):
        rc, _, err = _cli(capsys, "generate", out, "--backend", "ort", *opt)
        assert rc == 2 and err.count("\n") == 1, err
        assert "has no tokenizer" in err and "--prompt-ids" in err
    assert _cli(capsys, "generate", out, "--backend", "ort", "--prompt-ids", "1,2", "--max-new-tokens", "2")[0] == 0


# ---- must show: text equals transformers on the same checkpoint ------------------------------------------
def test_generate_prompt_equals_transformers_generate_and_decode(text_artifact, text_ckpt, hf_tok, capsys):
    import torch
    out = _cli_json(capsys, text_artifact, "--prompt", PROMPT, "--max-new-tokens", N)
    ids = hf_tok(PROMPT, return_tensors="pt")["input_ids"]
    assert out["prompt_ids"] == ids[0].tolist()
    with torch.no_grad():
        hf = hf_model(text_ckpt).generate(ids, max_new_tokens=N, do_sample=False)[0, ids.shape[1]:].tolist()
    want = hf_tok.decode(hf, skip_special_tokens=True)
    assert out["generated_ids"] == hf and out["text"] == want
    # the streamed terminal output is the same text (then the tokens/s line)
    rc, streamed, _ = _cli(capsys, "generate", text_artifact, "--backend", "ort", "--prompt", PROMPT,
                           "--max-new-tokens", N)
    assert rc == 0 and streamed.startswith(want + "\n"), (streamed, want)
    with capsys.disabled():
        print(f"\n[text] prompt {PROMPT!r} -> {out['text']!r} ({len(out['generated_ids'])} tokens; "
              f"transformers: {want!r})")


def test_chat_uses_apply_chat_template_ids(text_artifact, hf_tok, capsys, tmp_path):
    def template_ids(messages):
        got = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(got["input_ids"] if hasattr(got, "keys") else got)

    msg = "Hello there, kato mira?"
    out = _cli_json(capsys, text_artifact, "--chat", msg, "--max-new-tokens", 4)
    assert out["prompt_ids"] == template_ids([{"role": "user", "content": msg}])
    assert out["prompt_ids"][-1] == hf_tok.convert_tokens_to_ids("<|assistant|>")    # the generation prompt
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again, ka to mi"}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    out = _cli_json(capsys, text_artifact, "--chat-file", tmp_path / "chat.json", "--max-new-tokens", 4)
    assert out["prompt_ids"] == template_ids(chat)


def test_generation_stops_at_any_of_several_eos_ids(text_ckpt, hf_tok, tmp_path, capsys):
    """The generation config lists three EOS ids; the greedy continuation reaches the third one first:
    the CLI stops right there, as transformers' generate does with the same generation config."""
    import torch
    model = hf_model(text_ckpt)
    ids = hf_tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=N, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    stop = next(t for t in free[3:] if t not in free[:3] and t not in (2, 7))     # a token first seen at k >= 3
    k = free.index(stop)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(text_ckpt, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 7, stop]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    art = _export_and_build(ckpt, tmp_path / "art")
    assert read_manifest(art)["text"]["eos_token_ids"] == [2, 7, stop]
    out = _cli_json(capsys, art, "--prompt", PROMPT, "--max-new-tokens", N)
    assert out["generated_ids"] == free[:k + 1] and len(out["generated_ids"]) < N
    hf = transformers.JambaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=N, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out["generated_ids"] == want
    # and the engine-level rule: whichever listed id comes first ends the sequence
    from jambatrt.engines.generate import generate
    from jambatrt.engines.ort import OrtEngine
    with OrtEngine.load(art) as engine:
        first, later = free[1], free[k]
        got = generate(engine, [ids[0].tolist()], N, eos_id=[later, first])[0][0].generated_ids
        assert got == free[:free.index(first) + 1]


# ---- bad text input: one line, exit 2 ----------------------------------------------------------------------
def test_bad_text_input_gets_one_line_errors(text_artifact, tmp_path, capsys):
    a = ["generate", text_artifact, "--backend", "ort"]

    def one_line(args, *needles):
        rc, _, err = _cli(capsys, *args)
        assert rc == 2, (rc, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        for n in needles:
            assert n in err, err

    one_line([*a, "--prompt", ""], "InputError", "empty prompt")
    one_line([*a, "--prompt", "   "], "InputError", "empty prompt")
    one_line([*a, "--chat", ""], "InputError", "empty")
    # longer than the model's maximum context (262,144): ~300K tokens of text
    one_line([*a, "--prompt", "kato " * 300_000], "InputError", "exceeds the maximum context 262144")
    # invalid UTF-8 on the command line: Python hands undecodable argv bytes over as lone surrogates
    # (os.fsdecode is that decoding)
    one_line([*a, "--prompt", os.fsdecode(b"caf\xe9 \xff")], "InputError", "not valid UTF-8")
    cases = {"not-a-list.json": ('{"role": "user", "content": "hi"}', "not a list of messages"),
             "empty.json": ("[]", "not a list of messages"),
             "no-content.json": ('[{"role": "user"}]', "message 0"),
             "number.json": ('[{"role": "user", "content": 7}]', "message 0"),
             "not-json.json": ("[{role: user}]", "not JSON"),
             "bad-role.json": ('[{"role": "wizard", "content": "hi"}]', "chat template refused")}
    for name, (body, needle) in cases.items():
        (tmp_path / name).write_text(body)
        one_line([*a, "--chat-file", tmp_path / name], "InputError", needle)
    (tmp_path / "latin1.json").write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')
    one_line([*a, "--chat-file", tmp_path / "latin1.json"], "InputError", "not valid UTF-8")
    one_line([*a, "--chat-file", tmp_path / "missing.json"], "InputError", "cannot be read")
    one_line([*a, "--prompt", "x", "--chat", "y"], "UsageError", "exactly one of")
    one_line(a, "UsageError", "exactly one of")


# ---- published presets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_presets_match_published_totals(name, capsys):
    """`inspect --preset` of each published configuration against the parameter counts AI21 states
    (rounded in the sources: within 1%), and the preset's config.json is the published one field for field."""
    rc, out, err = _cli(capsys, "inspect", "--preset", name, "--json")
    assert rc == 0, err
    plan = json.loads(out)
    total, active = PUBLISHED_PARAMS[name]
    with capsys.disabled():
        print(f"\n[inspect] {name}: {plan['params_total']:,} total (published {total / 1e9:g}B), "
              f"{plan['params_active']:,} active (published {active / 1e9:g}B)")
    assert abs(plan["params_total"] - total) / total < 0.01
    assert abs(plan["params_active"] - active) / active < 0.01
    written = preset(name).to_hf_dict()
    for k, v in PRESETS[name].items():
        assert written[k] == v, (k, written[k], v)


def test_published_differences_from_v01():
    v01, mini, large = (preset(n) for n in ("jamba-v0.1", "jamba-1.5-mini", "jamba-1.5-large"))
    assert mini == v01                                                     # the same architecture
    assert v01.to_hf_dict()["eos_token_id"] == 2 and mini.to_hf_dict()["eos_token_id"] == [2, 518]
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.mamba_dt_rank) == (8192, 72, 64, 512)
    assert large.num_experts == v01.num_experts == 16 and large.num_moe_layers == 36


def test_sampling_goes_through_transformers_warpers():
    """pick() with temperature / top-p equals transformers' warpers + multinomial with the same generator."""
    import torch
    from jambatrt.engines.generate import Sampling, pick
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    got = pick(logits, Sampling(0.7, 0.8, 1), torch.Generator().manual_seed(5))
    z = torch.from_numpy(logits.astype(np.float64))
    z = z - z.max(-1, keepdim=True).values
    w = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(0.7), transformers.TopPLogitsWarper(0.8)])
    want = torch.multinomial(torch.softmax(w(None, z), -1), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert got.tolist() == want.tolist()
    assert (pick(logits, Sampling(1e-300, 1.0, 0), torch.Generator().manual_seed(0)) == logits.argmax(-1)).all()
