"""ONNX Runtime engine (issues 4 and 5): parity with eager and transformers, chunked prefill,
decode, generation, and refusal of tampered artifacts and bad input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_model_sums, hf_model, native_decode_matches_graph, run_cli
from jambatrt.engines.generate import Sampling, generate
from jambatrt.engines.ort import OrtEngine
from jambatrt.errors import ArtifactError, InputError
from jambatrt.validate.reference import EagerReference, HFReference


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    run_cli("build", tiny_artifact, "--backend", "ort", check=True)
    with OrtEngine.load(tiny_artifact) as e:
        yield e


@pytest.fixture(scope="module")
def eager(tiny_artifact):
    return EagerReference(tiny_artifact)


def _ids(B, L, seed=0, V=512):
    return np.random.default_rng(seed).integers(0, V, (B, L))


@pytest.mark.parametrize("L", [1, 17, 4096])
def test_engine_vs_eager(engine, eager, L):
    ids = _ids(1, L)
    got = engine.prefill(ids)[0]
    want = eager.prefill(ids)
    assert np.abs(got - want).max() <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_engine_vs_eager_32k(engine, eager):
    ids = _ids(1, 32768)
    got, want = engine.prefill(ids)[0], eager.prefill(ids)
    assert np.abs(got - want).max() <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("L", [1, 17, 4096])
def test_engine_vs_transformers(engine, tiny_artifact, L):
    ref = HFReference(tiny_artifact)
    ids = _ids(1, L, seed=1)
    got, want = engine.prefill(ids)[0], ref.prefill(ids)
    assert np.abs(got - want).max() <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_validate_cli_writes_report(tiny_artifact, engine, tmp_path):
    rep = tmp_path / "r.json"
    p = run_cli("validate", tiny_artifact, "--backend", "ort", "--lengths", "1,17,300", "--report", rep)
    assert p.returncode == 0, p.stderr
    r = json.loads(rep.read_text())
    assert r["passed"] is True and r["backend"] == "ort" and r["reference"] == "eager" and r["dtype"] == "float32"
    assert [x["length"] for x in r["results"]] == [1, 17, 300]
    for x in r["results"]:
        assert set(x) >= {"length", "max_abs_err", "mean_abs_err", "top1_agreement", "passed", "seconds"}
        assert x["max_abs_err"] <= 1e-3 and x["top1_agreement"] == 1.0
    assert rep.with_suffix(".md").exists()


@pytest.mark.parametrize("chunk", [64, 100, 1000])
def test_chunked_prefill_equals_unchunked(engine, chunk):
    ids = _ids(2, 1000, seed=2)
    full, s_full = engine.prefill(ids, chunk=4096)
    part, s_part = engine.prefill(ids, chunk=chunk)
    assert_same_model_sums(part, full, engine.config, 1000, f"logits chunk={chunk}")
    for a, b in zip(s_full, s_part):
        assert_same_model_sums(b, a, engine.config, 1000, f"state chunk={chunk}")


@pytest.mark.parametrize("chunk", [None, 100])
def test_prefill_last_computes_only_the_last_logits(engine, chunk):
    """The engine graph's logits_positions input (graph/passes/slice_logits.py): a prefill for
    generation runs the output layer on one position per chunk, and its logits equal the last of the
    full prefill's; the state is the same computation, whatever the logits."""
    from jambatrt.graph.passes.slice_logits import POSITIONS
    assert POSITIONS in engine.session_inputs
    V = engine.config.vocab_size
    ids = _ids(2, 300, seed=5)
    step, _ = engine.run_step_last(ids[:, :40], engine.zero_state(2))
    assert step.shape == (2, 1, V)
    full, s_full = engine.prefill(ids, chunk=chunk)
    last, s_last = engine.prefill(ids, chunk=chunk, last_only=True)
    assert full.shape == (2, 300, V) and last.shape == (2, V)
    assert_same_model_sums(last, full[:, -1], engine.config, 300, "last logits")
    for a, b in zip(s_full, s_last):
        np.testing.assert_array_equal(a, b)


def test_slice_logits_needs_a_linear_output_layer():
    """The pass refuses a graph whose logits do not come from a linear layer, naming what it found."""
    from onnx import TensorProto, helper

    from jambatrt.graph.passes.slice_logits import slice_logits
    g = helper.make_graph([helper.make_node("Relu", ["h"], ["logits"])], "g",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])])
    with pytest.raises(ArtifactError, match="producer is ai.onnx::Relu"):
        slice_logits(helper.make_model(g), None)


def test_decode_after_prefill_equals_longer_prefill(engine):
    ids = _ids(2, 50, seed=3)
    logits, state = engine.prefill(ids[:, :49])
    step, state2 = engine.decode(ids[:, 49], state)
    full, state_full = engine.prefill(ids)
    assert_same_model_sums(step, full[:, -1], engine.config, 50, "logits")
    for a, b in zip(state2, state_full):
        assert_same_model_sums(a, b, engine.config, 50, "state")


def test_native_decode_matches_graph_decode(engine, tiny_artifact):
    assert engine.decode_path == "native"
    native_decode_matches_graph(tiny_artifact)


def test_native_decode_of_tied_biased_model_and_graph_fallbacks(make_checkpoint, tiny_ckpt, tmp_path_factory):
    """The native step on a model with tied embeddings, Mamba projection biases and no conv bias; the graph
    decodes when the build asks for it, with --attention gqa and with float experts."""
    art = tmp_path_factory.mktemp("allmoe") / "art"
    run_cli("export", make_checkpoint("allmoe"), "-o", art, check=True)
    run_cli("build", art, "--backend", "ort", check=True)
    native_decode_matches_graph(art, seed=2)
    for flags, path in ((("--decode", "graph"), "graph"),
                        (("--attention", "gqa"), "graph (attention without the in-place KV cache (attention=gqa))")):
        run_cli("build", art, "--backend", "ort", *flags, check=True)
        with OrtEngine.load(art) as e:
            assert e.decode_path == path and e.decoder is None
    dense = tmp_path_factory.mktemp("dense") / "art"
    run_cli("export", tiny_ckpt, "-o", dense, "--no-experts-int8", check=True)
    run_cli("build", dense, "--backend", "ort", check=True)
    with OrtEngine.load(dense) as e:
        assert e.decode_path == "graph (float experts (the dense comparison export))"
    with pytest.raises(InputError, match="accepted: native, graph"):
        OrtEngine.Settings.from_kwargs(decode="fast")


def test_mapped_expert_weights_change_nothing_but_copies(engine, tiny_artifact):
    """The default session runs MoE as MoEInt8Mapped and the float linear layers as LinearF32Mapped
    (weights mapped from the engine's data file, not copied in on every call); a session of the engine
    file as written gives the same logits and state bit for bit (decode: to fp32 rounding, see below),
    and closing an engine releases its mapped weights."""
    from jambatrt.plugins.cpu import ort_ops
    cfg = engine.config
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    n_attn = sum(cfg.is_attention(i) for i in range(cfg.num_hidden_layers))
    n_linear = 4 * cfg.num_mamba_layers + 4 * cfg.num_attention_layers + 3 * cfg.num_dense_layers + 1
    weights = [ort_ops.bound(k) for k in engine.bound if isinstance(ort_ops.bound(k), tuple)]
    moe = [w for w in weights if len(w) == 4]
    assert len(moe) == n_moe and len(weights) == n_moe + n_linear
    assert len(engine.bound) == n_moe + n_linear + n_attn      # + one in-place KV cache per attention
    w13 = moe[0][0]
    assert w13.dtype == np.int8 and w13.ndim == 3 and not w13.flags.owndata      # a view of the mapped file
    ids = _ids(2, 33, seed=5)
    with OrtEngine.load(tiny_artifact, verify=False) as mapped:
        keys = mapped.bound
        plain = OrtEngine(tiny_artifact, map_weights=False)
        try:
            a_logits, a_state = mapped.prefill(ids)
            b_logits, b_state = plain.prefill(ids)
            step_a, _ = mapped.decode(ids[:, 0], a_state)
            step_b, _ = plain.decode(ids[:, 0], b_state)
        finally:
            plain.close()
        assert np.array_equal(a_logits, b_logits)
        assert all(np.array_equal(x, y) for x, y in zip(a_state, b_state))
        # the mapped session also keeps the KV cache in place, whose decode reads it through batch-strided
        # views: the attention kernel's sums may then round differently (fp32, not the weights)
        tol = 16 * np.finfo(np.float32).eps * np.abs(step_b).max() * cfg.num_hidden_layers
        assert np.abs(step_a - step_b).max() <= tol
    for k in keys:
        with pytest.raises(KeyError, match="not bound in this process"):
            ort_ops.bound(k)


def test_ragged_batch_gets_what_each_gets_alone(engine):
    prompts = [[5], [7, 8, 9, 10, 11], [3, 4, 100]]
    together, _ = generate(engine, prompts, 12)
    for p, g in zip(prompts, together):
        alone, _ = generate(engine, [p], 12)
        assert alone[0].generated_ids == g.generated_ids
    same_len = [[1, 2, 3], [4, 5, 6]]        # equal lengths run as one batch
    batch, _ = generate(engine, same_len, 12)
    for p, g in zip(same_len, batch):
        assert generate(engine, [p], 12)[0][0].generated_ids == g.generated_ids


def test_sampling_is_seeded(engine):
    a = generate(engine, [[1, 2]], 10, Sampling(temperature=0.8, top_p=0.9, seed=4))[0][0].generated_ids
    b = generate(engine, [[1, 2]], 10, Sampling(temperature=0.8, top_p=0.9, seed=4))[0][0].generated_ids
    assert a == b and len(a) == 10


def _hf_greedy(model, prompt, n):
    """transformers' greedy generate with its cache; EOS disabled (not suppressed: min_new_tokens
    would mask the EOS logit and change the argmax) so both run n tokens."""
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_greedy_tokens_match_transformers_generate(which, tiny_artifact, make_checkpoint, tmp_path_factory):
    if which == "tiny":
        art = tiny_artifact
        run_cli("build", art, "--backend", "ort", check=True)
    else:
        art = tmp_path_factory.mktemp("odd") / "art"
        run_cli("export", make_checkpoint("odd", seed=5), "-o", art, check=True)
        run_cli("build", art, "--backend", "ort", check=True)
    hf = HFReference(art).model
    V = hf.config.vocab_size
    with OrtEngine.load(art) as eng:
        for prompt in ([7], [1, 2, 3, 4, 5], list(range(10, 10 + 37)) if V > 50 else [9] * 37):
            ours = generate(eng, [prompt], 64)[0][0].generated_ids
            assert ours == _hf_greedy(hf, prompt, 64), prompt


def test_generate_cli_json(engine, tiny_artifact):
    p = run_cli("generate", tiny_artifact, "--backend", "ort", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["prompt_ids"] == [1, 2, 3] and len(out["generated_ids"]) == 5 and out["tokens_per_s"] > 0


def test_bad_runtime_input(engine):
    with pytest.raises(InputError, match="empty prompt"):
        generate(engine, [[]], 4)
    with pytest.raises(InputError, match="out of range"):
        engine.prefill(np.array([[1, 512]]))
    _, state = engine.prefill(_ids(2, 5))
    with pytest.raises(InputError, match="another model|batch"):
        engine.decode(np.array([1]), state)                     # batch 1 with a batch-2 state
    wrong = list(state)
    wrong[1] = np.zeros((2, 64, 8), np.float32)                  # another config's ssm state
    with pytest.raises(InputError, match="another model"):
        engine.decode(np.array([1, 2]), wrong)
    with pytest.raises(InputError, match="another model"):
        engine.decode(np.array([1, 2]), state[:-1])
    with pytest.raises(InputError, match="exceeds the maximum"):
        engine.prefill(np.zeros((1, engine.max_seq + 1), np.int64))


def test_generate_cli_errors_cleanly(engine, tiny_artifact):
    p = run_cli("generate", tiny_artifact, "--backend", "ort", "--prompt-ids", "", "--max-new-tokens", "2")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "empty prompt" in p.stderr
    p = run_cli("generate", tiny_artifact, "--backend", "ort", "--prompt-ids", "1", "--max-new-tokens", "300000")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "maximum context" in p.stderr


@pytest.mark.parametrize("damage", ["tamper_onnx", "drop_external_data"])
def test_tampered_artifact_refused(tiny_artifact, engine, tmp_path, damage):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    if damage == "tamper_onnx":
        data = bytearray((art / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (art / "model.onnx").write_bytes(bytes(data))
        needle = "model.onnx does not match its sha256"
    else:
        (art / "weights.safetensors").unlink()
        needle = "missing file weights.safetensors"
    for cmd in (["build", art, "--backend", "ort"], ["validate", art, "--backend", "ort", "--lengths", "3"]):
        p = run_cli(*cmd)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert needle in p.stderr and "ArtifactError" in p.stderr
    with pytest.raises(ArtifactError):
        OrtEngine.load(art)


def test_default_prefill_chunk_bounds_the_logits_and_activations():
    """Prefill chunks keep their float32 logits [batch, chunk, vocab] within LOGITS_CHUNK_BYTES and their
    largest other activation (export/plan.py activation_tensors) within ACTIVATION_CHUNK_BYTES: the longest
    such multiple of 256 tokens, between 512 and 16384."""
    from jambatrt.config import preset
    from jambatrt.engines.base import ACTIVATION_CHUNK_BYTES, LOGITS_CHUNK_BYTES, default_chunk
    from jambatrt.export.plan import chunk_activation_elements

    def fits(cfg, batch, c):
        logits, other = chunk_activation_elements(cfg, batch, c)
        return 4 * logits <= LOGITS_CHUNK_BYTES and 4 * other <= ACTIVATION_CHUNK_BYTES

    assert default_chunk(preset("tiny"), 1) == 16384                 # the test presets: unchanged
    for name in ("tiny", "bench", "peer", "jamba-1.5-mini"):
        for batch in (1, 2, 4):
            cfg = preset(name)
            c = default_chunk(cfg, batch)
            assert c % 256 == 0 and 512 <= c <= 16384
            assert c == 512 or fits(cfg, batch, c), (name, batch, c)
            assert c == 16384 or not fits(cfg, batch, c + 256), (name, batch, c)
    assert default_chunk(preset("peer"), 1) == 1280 and default_chunk(preset("jamba-1.5-mini"), 1) == 512
    # a wide vocabulary alone: the logits bound
    assert default_chunk(preset("tiny", vocab_size=32000), 1) == 2048


def test_prefill_gives_back_its_intermediates(engine, monkeypatch):
    """A prefill's multi-token runs ask ONNX Runtime to shrink its CPU arena when they end, decode steps
    through the graph do not, and the prefill then trims the C heap past what it keeps (engines/ort.py
    `OrtEngine.prefill`, `trim_heap`): what a prefill's chunks held does not stay resident through the decode
    that follows."""
    from jambatrt.engines import ort as ort_engine
    from jambatrt.plugins.cpu import ort_ops
    ort_engine.trim_heap()                                     # the real one runs (glibc) or does nothing
    seen, trims = [], []
    real = ort_ops.run_checked
    monkeypatch.setattr(ort_ops, "run_checked",
                        lambda s, names, feeds, ro=None: (seen.append(ro), real(s, names, feeds, ro))[1])
    monkeypatch.setattr(ort_engine, "trim_heap", lambda: trims.append(1))
    ids = np.random.default_rng(2).integers(0, engine.config.vocab_size, (1, 20))
    logits, st = engine.prefill(ids, chunk=8)
    assert len(seen) == 3 and trims == [1]
    assert all(ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0" for ro in seen)
    seen.clear()
    monkeypatch.setattr(engine, "decoder", None)                # decode through the graph: one-token runs
    engine.decode(logits[:, -1].argmax(-1), st)
    assert seen == [None] and trims == [1]


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_trim_heap_keeps_a_bounded_free_heap():
    """trim_heap gives the C heap's freed memory back only past `keep` bytes of it (default HEAP_KEEP_BYTES):
    up to there it stays mapped for the next prefill's temporaries instead of being faulted in again."""
    from jambatrt.plugins.cpu import ort_ops
    if ort_ops.heap_free_bytes() is None or not ort_ops.tune_malloc():
        pytest.skip("glibc's malloc_trim / mallinfo2 / mallopt not available (another C library)")
    ort_ops.trim_heap(keep=0)
    blocks = [np.ones(1 << 20, np.float32) for _ in range(16)]     # 64 MiB, heap blocks under the mmap threshold
    del blocks
    free = ort_ops.heap_free_bytes()
    assert free >= 64 << 20
    resident = _resident_bytes()
    assert not ort_ops.trim_heap(keep=free)                      # within the budget: kept, still resident
    assert _resident_bytes() >= resident - (8 << 20)
    assert ort_ops.trim_heap(keep=free - 1)                       # past it: given back
    assert _resident_bytes() <= resident - (48 << 20)
