"""TensorRT path (issue 7): what can be checked without TensorRT is checked here — the plugin
descriptors against the op SPECs and the `jamba` nodes of the exported model.onnx, the AOT
compilation of every kernel (`jambatrt plugins`) and its resource usage (no spills), the build
plan (chunking, profiles), the builder's host memory and the errors when TensorRT is missing.
The QDP plugin code runs through TensorRT's own plugin layer in test_tensorrt_plugin_layer.py.
Building and running an engine needs TensorRT + a GPU."""

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli
from jambatrt.errors import BackendUnavailable, InputError
from jambatrt.export.ops import DOMAIN, SPECS

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


# ---- descriptors vs SPEC and the ONNX nodes ----------------------------------------------------------
def test_descriptors_match_spec():
    from jambatrt.plugins.tensorrt import QDP_VERSION, descriptors
    table = descriptors()
    for name, spec in SPECS.items():
        d = table[spec.plugin_name]
        assert (d.op, d.name, d.namespace, d.version) == (name, spec.onnx_op_type, DOMAIN, str(spec.version))
        assert d.version == QDP_VERSION, "QDP registers every plugin as version 1"
        assert d.attributes == {k: t.__name__ for k, t in spec.attributes.items()}
        assert (d.inputs, d.outputs) == (tuple(spec.inputs), tuple(spec.outputs))
        assert d.lowering == "node"
    extra = {n for n, d in table.items() if d.lowering != "node"}
    assert extra == {"MoEInt8Route", "MoEInt8GroupedUp", "MoEInt8GroupedDown"}


def test_descriptors_name_their_eager_launchers():
    """Every plugin (and tactic) names the plugins/gpu launcher that launches its kernel eagerly:
    the plugin harness compares the two launches."""
    from jambatrt.plugins.tensorrt import descriptors
    for name, d in descriptors().items():
        assert set(d.launchers) == (set(d.tactics) or {0}), name
        for launcher in d.launchers.values():
            module, fn = launcher.split(":")
            assert callable(getattr(importlib.import_module(f"jambatrt.plugins.gpu.{module}"), fn)), launcher


def test_descriptors_match_onnx_nodes(tiny_artifact):
    """Every jamba-domain node of the exported model.onnx finds its plugin the way TensorRT's ONNX
    parser looks it up: op_type == plugin name, domain == namespace, plugin_version (default "1"),
    the same attributes, the same number of inputs and outputs."""
    from jambatrt.plugins.tensorrt import descriptors
    table = descriptors()
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in nodes} == {s.onnx_op_type for s in SPECS.values()}
    for n in nodes:
        d = table[n.op_type]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        version = attrs.pop("plugin_version", b"1")
        assert (d.namespace, d.version) == (n.domain, version.decode() if isinstance(version, bytes) else str(version))
        assert set(attrs) == set(d.attributes), n.name
        assert all(type(v).__name__ == d.attributes[k] for k, v in attrs.items()), n.name
        assert len(n.input) == len(d.inputs) and all(n.input), f"{n.name}: every plugin input must be present"
        assert len(n.output) == len(d.outputs), n.name


# ---- AOT: jambatrt plugins -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugins") / "aot"
    run_cli("plugins", "--arch", "sm_80,sm_90", "-o", out, "--jobs", "2", check=True, timeout=1200)
    return out


def _ptx_params(ptx: str, function: str) -> str:
    """The kernel's parameter kinds in order: p (64-bit pointer) or i (32-bit int)."""
    body = re.search(r"\.entry\s+" + re.escape(function) + r"\((.*?)\)", ptx, re.S)
    assert body, f".entry {function} not in the PTX"
    return "".join("p" if w == "u64" else "i" for w in re.findall(r"\.param\s+\.(u64|u32|b32|s32)", body[1]))


def test_plugins_cli_compiles_every_kernel(plugins_dir):
    import triton

    from jambatrt.plugins.gpu.aot import all_kernels
    index = json.loads((plugins_dir / "index.json").read_text())
    assert index["triton_version"] == triton.__version__
    assert index["archs"] == ["sm_80", "sm_90"]
    want = {(k.name, a) for k in all_kernels() for a in ("sm_80", "sm_90")}
    assert {(e["kernel"], e["arch"]) for e in index["kernels"]} == want
    functions = {e["function"] for e in index["kernels"]}
    assert functions == {k.kernel_name for k in all_kernels()}
    for e in index["kernels"]:
        ptx = (plugins_dir / e["files"]["ptx"]).read_bytes()
        assert hashlib.sha256(ptx).hexdigest() == e["sha256"]["ptx"]
        assert hashlib.sha256((plugins_dir / e["files"]["cubin"]).read_bytes()).hexdigest() == e["sha256"]["cubin"]
        assert e["ptx_version"] == "8.0", "unpinned PTX is refused by older drivers"
        assert e["ptx_target"] == {"sm_80": "sm_80", "sm_90": "sm_90a"}[e["arch"]]
        assert e["scratch_bytes"] == {"global_scratch": 0, "profile_scratch": 0}
        assert e["shared_bytes"] <= 48 * 1024
        p = e["params"]
        kinds = "".join("i" if e["signature"][n] == "i32" else "p" for n in e["signature"]
                        if e["signature"][n] != "constexpr")
        assert kinds == "p" * len(p["inputs"]) + "i" * len(p["extras"]) + "p" * len(p["outputs"])
        # PTX: the same order plus Triton's two hidden scratch pointers
        assert _ptx_params(ptx.decode(), e["function"]) == kinds + "pp"


def test_compiled_kernels_are_the_production_variants():
    """`jambatrt plugins` compiles the variants Jamba-1.5-Mini and -Large launch: constexprs from
    their dims (d_state 16, conv width 4, top-2 of 16 experts, head_dim 128); hidden (4096 / 8192)
    and expert sizes (14336 / 24576) are run-time arguments of the same kernels."""
    from jambatrt.config import preset
    from jambatrt.plugins.gpu.aot import all_kernels, kernels_for_config

    def variants(specs):
        return {(k.name, tuple(sorted(k.constexprs.items())), k.num_warps, k.num_stages) for k in specs}
    compiled = variants(all_kernels())
    for name in ("jamba-1.5-mini", "jamba-1.5-large"):
        cfg = preset(name)
        assert cfg.head_dim == 128 and cfg.num_experts == 16
        assert variants(kernels_for_config(cfg)) == compiled, name


def test_kernel_resources_no_spills(plugins_dir):
    """Every kernel at production shapes, sm_80 and sm_90, read back from its cubin (cuobjdump):
    no stack frame (spills), shared memory within the architecture's per-block limit and within
    the 48 KiB TensorRT's AOT launch gives. The table is printed (pytest -s, or on failure)."""
    from jambatrt.plugins.gpu.aot import resource_problems
    index = json.loads((plugins_dir / "index.json").read_text())
    lines = [f"{'arch':6} {'kernel':34} {'warps':>5} {'regs':>4} {'stack':>5} {'shared':>7} {'blocks/SM':>9} "
             f"{'occupancy':>9}  limited by"]
    for e in index["kernels"]:
        r = e["resources"]
        assert r is not None, f"{e['arch']} {e['kernel']}: cuobjdump (bundled with Triton) gave no resource usage"
        o = r["occupancy"]
        lines.append(f"{e['arch']:6} {e['kernel']:34} {e['num_warps']:>5} {r['registers']:>4} {r['stack']:>5} "
                     f"{e['shared_bytes'] + r['shared']:>7} {o['blocks_per_sm']:>9} {o['occupancy']:>9.0%}  "
                     f"{o['limited_by']}")
    table = "\n".join(lines)
    print(table)
    problems = [p for e in index["kernels"] for p in resource_problems(e)]
    assert not problems, "\n".join(problems) + "\n" + table
    assert {e["arch"] for e in index["kernels"]} == {"sm_80", "sm_90"}


def test_resource_check_flags_spills_and_shared():
    """resource_problems() catches what the table test relies on it to catch."""
    from jambatrt.plugins.gpu.aot import resource_problems
    base = {"arch": "sm_90", "kernel": "k", "shared_bytes": 4096,
            "resources": {"registers": 255, "stack": 0, "shared": 1024, "local": 0}}
    assert resource_problems(base) == []
    spilled = {**base, "resources": {**base["resources"], "stack": 504}}
    assert "spills" in resource_problems(spilled)[0]
    big = {**base, "shared_bytes": 48 * 1024}
    assert "does not opt in" in resource_problems(big)[0]
    huge = {**base, "arch": "sm_80", "shared_bytes": 200_000}
    assert any("an sm_80 block can have" in p for p in resource_problems(huge))


def test_occupancy_matches_the_cuda_calculator():
    """Hand-checked against NVIDIA's occupancy rules: 255 registers x 256 threads fills the register
    file with one block; 64 registers x 128 threads allow 8 blocks (32 warps of 2048 registers); at
    24 registers the 2048 threads of an SM bind first (16 blocks); 100 KiB of shared memory leaves room for one block on sm_80, two on sm_90."""
    from jambatrt.plugins.gpu.aot import occupancy
    assert occupancy(80, 255, 256, 0) == {"blocks_per_sm": 1, "warps_per_sm": 8, "occupancy": 0.125,
                                          "limited_by": "registers"}
    assert occupancy(80, 64, 128, 0)["blocks_per_sm"] == 8
    assert occupancy(80, 24, 128, 0) == {"blocks_per_sm": 16, "warps_per_sm": 64, "occupancy": 1.0,
                                         "limited_by": "threads"}
    assert occupancy(80, 32, 128, 100 * 1024)["blocks_per_sm"] == 1
    assert occupancy(90, 32, 128, 100 * 1024)["blocks_per_sm"] == 2


# ---- the build plan (no TensorRT needed) ------------------------------------------------------------
def test_build_plan_profiles(tiny_artifact):
    from jambatrt.engines.tensorrt import TensorRTSettings, plan_build
    from jambatrt.manifest import Manifest
    m = Manifest.read(tiny_artifact)
    plan = plan_build(m, TensorRTSettings(max_batch=4, max_seq=65536, chunk_cap=4096))
    assert plan["chunk_plan"]["chunk"] == 4096 and plan["chunk_plan"]["fits"]
    pre, dec = plan["profiles"]
    assert (pre["name"], dec["name"]) == ("prefill", "decode")
    assert pre["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 4096], "max": [4, 4096]}
    assert dec["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [4, 1]}
    kv = [n for n in pre["shapes"] if n.endswith(".k")][0]
    assert pre["shapes"][kv]["min"][1] == 0 and pre["shapes"][kv]["max"][1] == 65535
    assert set(pre["shapes"]) == {i.name for i in m.step.inputs}
    with pytest.raises(InputError, match="unknown TensorRT setting"):
        TensorRTSettings.from_kwargs(max_batch=2, fp8=True)


def test_build_plan_at_256k():
    """Mini at 262,144 tokens: a chunked plan whose worst step (a full chunk after the longest past)
    stays under 2^31; Large's stacked experts (6.4e9 elements per layer) go into 4 groups of 4."""
    from jambatrt.config import preset
    from jambatrt.engines.tensorrt import TensorRTSettings, plan_build
    from jambatrt.manifest import Manifest
    step = {"max_seq": 262_144, "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
            "outputs": []}
    mini = Manifest(Path("mini"), {"config": preset("jamba-1.5-mini").to_hf_dict(), "programs": {"step": step}})
    plan = plan_build(mini, TensorRTSettings())
    assert plan["chunk_plan"]["fits"] and plan["chunk_plan"]["chunk"] == 4096 and plan["chunk_plan"]["batch"] == 4
    with pytest.raises(InputError, match="attention.kv"):
        plan_build(mini, TensorRTSettings(max_batch=8))
    large = Manifest(Path("large"), {"config": preset("jamba-1.5-large").to_hf_dict(), "programs": {"step": step}})
    plan = plan_build(large, TensorRTSettings(max_batch=1))
    assert plan["expert_groups"] == [[0, 4], [4, 8], [8, 12], [12, 16]]
    assert plan_build(mini, TensorRTSettings())["expert_groups"] == [[0, 16]]


def test_lowered_graph_for_the_parser(tiny_artifact):
    """What the build hands TensorRT's parser (parse(bytes, path)): the lowered graph alone, its
    weights left in the artifact's weights.safetensors (read relative to the path), every jamba node a
    registered plugin."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from jambatrt.engines.tensorrt import _lowered_onnx
    from jambatrt.manifest import Manifest
    from jambatrt.plugins.tensorrt import descriptors
    blob, path, passes = _lowered_onnx(Manifest.read(tiny_artifact), "grouped")
    assert path == tiny_artifact / "model.onnx" and passes[:2] == ["split_expert_groups", "lower_moe_grouped"]
    model = onnx.ModelProto.FromString(blob)
    big = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 or np.prod(t.dims) >= 1024]
    assert big and all(uses_external_data(t) and ExternalDataInfo(t).location == "weights.safetensors" for t in big)
    table = descriptors()
    assert {n.op_type for n in model.graph.node if n.domain == DOMAIN} <= set(table)
    assert "MoEInt8Route" in {n.op_type for n in model.graph.node}


def test_build_frees_the_parsed_weights_before_serialising(tiny_artifact, tmp_path, monkeypatch):
    """The build's host-memory order, against a recording stand-in for TensorRT's builder objects:
    the engine is built, parser and network (which hold every parsed weight) are freed, and only
    then is the engine serialised; the plan is written from TensorRT's buffer, never copied with
    bytes() (engines.tensorrt.build_host_memory: one copy of the weights on the host at a time)."""
    import shutil
    import types
    import weakref

    import jambatrt.engines.tensorrt as E
    import jambatrt.plugins.tensorrt as P
    events = []

    class HostMemory(np.ndarray):
        def __bytes__(self):
            raise AssertionError("the plan was copied with bytes()")

    def tracked(name, obj):
        weakref.finalize(obj, events.append, f"{name} freed")
        return obj

    class Network:
        pass

    class Parser:
        def __init__(self, network, logger):
            self.network = network                     # TensorRT's parser keeps its network alive
            tracked("parser", self)

        def parse(self, model, path):
            events.append("parse")
            return True

    class Config(types.SimpleNamespace):
        def set_memory_pool_limit(self, *a):
            pass

        def create_timing_cache(self, blob):
            return blob

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def add_optimization_profile(self, p):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: np.frombuffer(b"cache", np.uint8).view(HostMemory))

    class Engine:
        def serialize(self):
            events.append("serialize")
            return np.frombuffer(b"PLAN" * 8, np.uint8).view(HostMemory)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return tracked("network", Network())

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_engine_with_config(self, network, config):
            events.append("build")
            return Engine()

    class Logger:
        WARNING = 0

        def __init__(self, severity):
            pass

    trt = types.SimpleNamespace(
        __version__="stand-in", Logger=Logger, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0), BuilderFlag=types.SimpleNamespace(BF16=0))
    cuda = types.SimpleNamespace(get_device_capability=lambda: (9, 0), get_device_name=lambda: "stand-in")
    monkeypatch.setattr(P, "require_tensorrt", lambda: (trt, None))
    monkeypatch.setattr(P, "register_all", lambda: [])
    monkeypatch.setattr(E, "_require_gpu", lambda: types.SimpleNamespace(cuda=cuda))
    art = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, art)
    entry = E.TensorRTEngine.build(art, max_batch=2, max_seq=4096)
    assert events.index("parse") < events.index("build") < events.index("parser freed") < events.index("serialize")
    assert events.index("network freed") < events.index("serialize"), events
    assert (art / entry["path"]).read_bytes() == b"PLAN" * 8
    assert (art / E.SUBDIR / E.TIMING_CACHE).read_bytes() == b"cache"
    assert E.build_host_memory(60 * 10**9)["peak"] == 60 * 10**9


def test_inspect_states_the_build_host_memory():
    """`jambatrt inspect` states the host memory a TensorRT build needs: for Jamba-1.5-Mini with int8
    experts the weights once (58 GB), well inside a 128 GiB host; the three copies the build used to
    hold (parsed weights, plan, a bytes() copy of it) would not fit."""
    p = run_cli("inspect", "--preset", "jamba-1.5-mini", "--json", check=True)
    plan = json.loads(p.stdout)
    host = plan["tensorrt_build_host_bytes"]
    assert host == plan["weight_bytes"] and 55e9 < host["experts_int8"] < 60e9
    assert host["experts_int8"] < 128 * 2**30 < 3 * host["experts_int8"]
    text = run_cli("inspect", "--preset", "jamba-1.5-mini", check=True).stdout
    assert "host memory: tensorrt build" in text and f"{host['experts_int8'] / 1e9:.1f} GB" in text


def test_missing_tensorrt_is_named(tiny_artifact, tmp_path, monkeypatch):
    """Without TensorRT, build says so in one line. TensorRT is hidden for the test (in this
    process through sys.modules, in the CLI's through a shadowing package), so it runs whether or
    not TensorRT is installed."""
    from jambatrt.engines.tensorrt import TensorRTEngine
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # `import tensorrt` raises ImportError
    with pytest.raises(BackendUnavailable, match="TensorRT not installed"):
        TensorRTEngine.build(tiny_artifact)
    shadow = tmp_path / "no_tensorrt" / "tensorrt"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'tensorrt\' (hidden by the test)")\n')
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    p = run_cli("build", tiny_artifact, "--backend", "tensorrt", env={"PYTHONPATH": path})
    assert p.returncode == 2 and "BackendUnavailable: TensorRT not installed" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# ---- with TensorRT and a GPU ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_engine(tiny_artifact, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    import shutil

    import torch
    if not torch.cuda.is_available():
        pytest.skip("TensorRT installed but no CUDA GPU visible")
    from jambatrt.engines.tensorrt import TensorRTEngine
    art = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny_artifact, art)
    TensorRTEngine.build(art, max_batch=2, max_seq=8192, chunk_cap=256)
    with TensorRTEngine.load(art) as e:
        yield e


@pytest.mark.parametrize("L", [1, 17, 600])
def test_tensorrt_engine_vs_eager(trt_engine, L):
    from jambatrt.validate.reference import EagerReference
    ids = np.random.default_rng(L).integers(0, 512, (1, L))
    got = trt_engine.prefill(ids)[0]
    want = EagerReference(trt_engine.artifact).prefill(ids)
    assert np.abs(got.astype(np.float32) - want).max() <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_tensorrt_decode_matches_prefill(trt_engine):
    ids = np.random.default_rng(3).integers(0, 512, (2, 40))
    full = trt_engine.prefill(ids)[0]
    _, state = trt_engine.prefill(ids[:, :39])
    last, _ = trt_engine.decode(ids[:, 39], state)
    assert np.abs(last - full[:, -1]).max() <= 1e-3
    assert trt_engine.entry["chunk_plan"]["chunk"] == 256
