import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import jambatrt  # noqa: E402,F401
from jambatrt.export.checkpoint import write_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Configs for parity: vary layer periods/offsets, expert count, top-k, odd sizes, tied embeddings, biases.
PARITY_CONFIGS = {
    "tiny": {},
    "odd": dict(vocab_size=301, hidden_size=48, intermediate_size=72, num_hidden_layers=5, num_attention_heads=6,
                num_key_value_heads=3, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=3,
                expert_layer_offset=2, num_experts=5, num_experts_per_tok=1, mamba_d_state=5, mamba_d_conv=3,
                mamba_dt_rank=7),
    "allmoe": dict(vocab_size=200, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                   expert_layer_offset=0, num_experts=6, num_experts_per_tok=3, mamba_d_state=4, mamba_dt_rank=3,
                   tie_word_embeddings=True, mamba_proj_bias=True, mamba_conv_bias=False, mamba_expand=3),
}


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    cache = {}

    def make(name="tiny", seed=0):
        if (name, seed) not in cache:
            out = tmp_path_factory.mktemp("ckpt") / f"{name}-{seed}"
            overrides = PARITY_CONFIGS.get(name, {})
            write_preset("tiny" if name in PARITY_CONFIGS else name, out, seed=seed, **overrides)
            cache[(name, seed)] = out
        return cache[(name, seed)]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_checkpoint):
    return make_checkpoint("tiny")


def run_cli(*args, check=False, env=None, timeout=900):
    """Run `python -m jambatrt ...` in a child process; returns CompletedProcess."""
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "jambatrt", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"jambatrt {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny"
    run_cli("export", "--preset", "tiny", "-o", out, check=True)
    return out


def hf_model(ckpt):
    """transformers' JambaForCausalLM on our checkpoint (fp32, eager attention off: sdpa)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[test]')")
    transformers.logging.set_verbosity_error()
    return transformers.JambaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def mamba_refs():
    """mamba-ssm's selective_scan_ref / selective_state_update_ref, imported without CUDA through
    temporary stubs (NOTES-ENV.md); the stubs are removed right after the import."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        pytest.skip("mamba-ssm not installed (make setup installs it with MAMBA_SKIP_CUDA_BUILD=TRUE)")
    stubs = {}
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    stubs["mamba_ssm"] = pkg
    stubs["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    ln = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    ln._layer_norm_fwd = None
    stubs["mamba_ssm.ops.triton.layer_norm"] = ln
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        fn = mod.selective_scan_ref
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith("mamba_ssm")]:
            sys.modules.pop(k, None)
    return {"selective_scan_ref": fn}


@pytest.fixture(scope="session")
def serve_env():
    """The numpy<2 environment tritonserver's Python backend runs in (`make serve-setup`)."""
    from jambatrt.deploy.server import find_serve_env
    from jambatrt.errors import BackendUnavailable

    try:
        env = find_serve_env()
    except BackendUnavailable as e:
        pytest.skip(f"serve env unavailable: {e}")
    try:
        import tritonclient.http  # noqa: F401
    except ImportError as e:
        pytest.skip(f"serve env incomplete: tritonclient[http] not importable in the test env ({e}); "
                    "`make serve-setup` installs it")
    return env
