"""ONNX graph (issue 4): jamba-domain schemas, full checker, shape inference, external data, passes."""

import onnx
import pytest

from jambatrt.errors import ArtifactError
from jambatrt.export.ops import DOMAIN, SPECS
from jambatrt.graph.onnx_export import check, load_onnx, save_onnx
from jambatrt.graph.passes import PassSettings, ort_passes, run_passes
from jambatrt.graph.passes.check_memory_flat import check_memory_flat, quadratic_tensors
from jambatrt.graph.schemas import register_schemas


@pytest.fixture(scope="module")
def onnx_model(tiny_artifact):
    return load_onnx(tiny_artifact / "model.onnx")


def test_jamba_nodes_match_specs(onnx_model):
    register_schemas()
    nodes = [n for n in onnx_model.graph.node if n.domain == DOMAIN]
    by_type = {s.onnx_op_type: s for s in SPECS.values()}
    assert {n.op_type for n in nodes} == set(by_type)
    for n in nodes:
        spec = by_type[n.op_type]
        assert len(n.output) == len(spec.outputs)
        assert {a.name for a in n.attribute} == set(spec.attributes)
        schema = onnx.defs.get_schema(n.op_type, 1, DOMAIN)
        assert [i.name for i in schema.inputs] == list(spec.inputs)
    assert any(o.domain == DOMAIN and o.version == 1 for o in onnx_model.opset_import)


def test_full_checker_and_shape_inference(tiny_artifact, onnx_model):
    check(tiny_artifact / "model.onnx")   # full_check with the schemas registered
    inferred = run_passes(onnx.ModelProto.FromString(onnx_model.SerializeToString()), PassSettings(),
                          ort_passes(PassSettings()))
    out = {vi.name: vi for vi in inferred.graph.value_info}
    scans = [n for n in inferred.graph.node if n.op_type == "SelectiveScan"]
    state = out.get(scans[0].output[1]) or next(o for o in inferred.graph.output if o.name == scans[0].output[1])
    dims = [d.dim_param or d.dim_value for d in state.type.tensor_type.shape.dim]
    assert dims == ["batch", 128, 8]     # [B, D_inner, N] from our inference function


def test_weights_are_external_and_reload(tmp_path, onnx_model):
    path = tmp_path / "m.onnx"
    save_onnx(onnx.ModelProto.FromString(onnx_model.SerializeToString()), path, size_threshold=16)   # not the fixture
    assert (tmp_path / "m.onnx.data").stat().st_size > path.stat().st_size
    again = load_onnx(path)
    assert len(again.graph.initializer) == len(onnx_model.graph.initializer)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="external data|missing"):
        load_onnx(path)


def test_memory_flat_check_catches_seq_by_seq(onnx_model):
    assert quadratic_tensors(onnx_model) == []
    bad = onnx.ModelProto.FromString(onnx_model.SerializeToString())
    vi = onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["batch", 4, "seq", "past + seq"])
    bad.graph.value_info.append(vi)
    with pytest.raises(ArtifactError, match="two sequence-length dimensions"):
        check_memory_flat(bad)


@pytest.mark.parametrize("attention", ["kernel", "gqa"])
def test_final_ort_graph_has_no_quadratic_tensor(onnx_model, attention):
    s = PassSettings(attention=attention)
    m = run_passes(onnx.ModelProto.FromString(onnx_model.SerializeToString()), s, ort_passes(s))
    assert quadratic_tensors(m) == []
    types = {(n.domain, n.op_type) for n in m.graph.node}
    assert (("com.microsoft", "GroupQueryAttention") in types) == (attention == "gqa")
    assert (("jamba", "CausalAttention") in types) == (attention == "kernel")


# ---- expert groups (TensorRT's 2^31-element limit on weights) ---------------------------------------
def test_expert_groups_are_few_and_balanced():
    from jambatrt.config import preset
    from jambatrt.export.plan import expert_groups, moe_expert_groups
    assert expert_groups(4, 10, limit=40) == [(0, 4)]
    assert expert_groups(5, 10, limit=30) == [(0, 2), (2, 5)]        # 2 groups of <= 3, sizes 2 and 3
    assert expert_groups(16, 10, limit=50) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    with pytest.raises(ValueError, match="one expert"):
        expert_groups(4, 100, limit=50)
    large = moe_expert_groups(preset("jamba-1.5-large"))                 # w13 [16, 49152, 8192] = 6.4e9
    assert large == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert moe_expert_groups(preset("jamba-1.5-mini")) == [(0, 16)]    # 16 x 28672 x 4096 < 2^31


def _session(model, weights_dir=None):
    """An ORT session of a model file, or of a serialized graph whose external weights lie in weights_dir."""
    import onnxruntime as ort

    from jambatrt.engines.ort import _session_options
    so = _session_options()
    if weights_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def _feed(session, tokens=13, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session.get_inputs():
        shape = [1 if d == "batch" else tokens if d == "seq" else 0 if d == "past" else d for d in i.shape]
        feed[i.name] = (rng.integers(0, 512, shape) if i.name == "input_ids"
                        else rng.standard_normal(shape).astype(np.float32) * 0.1)
    return feed


@pytest.mark.parametrize("limit, n_groups", [(40_000, 2), (20_000, 4), (3 * 16384, 2)])
def test_split_expert_groups_keeps_the_model(tmp_path, tiny_artifact, limit, n_groups):
    """The TensorRT pass on the tiny model with a lowered limit (one expert: 2I x H = 16,384
    elements): every MoE layer becomes n_groups MoEInt8 nodes + Sum, no initializer exceeds the
    limit, the new weights point into the artifact's own data file at offsets (no copy: the lowered
    graph is a few KB and reads the artifact's weights, as TensorRT's parser does with the artifact
    path), and ONNX Runtime gives the logits and state of the unsplit model."""
    import numpy as np
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from jambatrt.graph.passes import materialize_optional_inputs, split_expert_groups
    from jambatrt.plugins.cpu.ort_ops import run_checked

    s = PassSettings(tensor_limit=limit)
    passes = [split_expert_groups, materialize_optional_inputs]
    original = load_onnx(tiny_artifact / "model.onnx", load_external_data=False)
    n_moe = sum(n.op_type == "MoEInt8" for n in original.graph.node)
    split = run_passes(onnx.ModelProto.FromString(original.SerializeToString()), s, passes)
    moe = [n for n in split.graph.node if n.op_type == "MoEInt8"]
    assert len(moe) == n_moe * n_groups and sum(n.op_type == "Sum" for n in split.graph.node) == n_moe
    offsets = sorted({onnx.helper.get_attribute_value(a) for n in moe for a in n.attribute if a.name == "expert_offset"})
    assert len(offsets) == n_groups and offsets[0] == 0
    weights = [t for t in split.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(np.prod(t.dims) <= limit for t in weights)
    assert all(uses_external_data(t) and ExternalDataInfo(t).location == "weights.safetensors" for t in weights)
    graph = split.SerializeToString()
    assert len(graph) < 1 << 20                                            # the graph only, weights referenced

    base = tmp_path / "base"
    base.mkdir()
    save_onnx(run_passes(load_onnx(tiny_artifact / "model.onnx"), s, [materialize_optional_inputs]), base / "model.onnx")
    want_s, got_s = _session(base / "model.onnx"), _session(graph, weights_dir=tiny_artifact)
    feed = _feed(want_s)
    names = [o.name for o in want_s.get_outputs()]
    want, got = run_checked(want_s, names, feed), run_checked(got_s, names, feed)
    # equal to the bit on any CPU: the same kernels on the same values; a token's top-2 expert outputs
    # are added in one kernel or, split across groups, by Sum (exact adds of zeros, and a + b = b + a)
    for n, w, g in zip(names, want, got):
        np.testing.assert_array_equal(g, w, err_msg=n)
    # in-memory weights are sliced the same way
    inmem = run_passes(load_onnx(tiny_artifact / "model.onnx"), s, passes)
    save_onnx(inmem, tmp_path / "inmem.onnx")
    got2 = run_checked(_session(tmp_path / "inmem.onnx"), names, feed)
    for n, w, g in zip(names, want, got2):
        np.testing.assert_array_equal(g, w, err_msg=n)


def test_split_expert_groups_leaves_small_layers_alone(onnx_model):
    from jambatrt.graph.passes import split_expert_groups
    m = split_expert_groups(onnx.ModelProto.FromString(onnx_model.SerializeToString()), PassSettings())
    assert [n.op_type for n in m.graph.node] == [n.op_type for n in onnx_model.graph.node]


@pytest.mark.parametrize("moe", ["grouped", "fused"])
def test_final_tensorrt_graph(tiny_artifact, moe):
    """The TensorRT pass list on the weights-not-loaded model (as engines/tensorrt.py runs it):
    MoE as the grouped plugins by default, every plugin input present, no L x L tensor."""
    from jambatrt.graph.passes import tensorrt_passes
    s = PassSettings(moe=moe)
    m = run_passes(load_onnx(tiny_artifact / "model.onnx", load_external_data=False), s, tensorrt_passes(s))
    types = [n.op_type for n in m.graph.node if n.domain == DOMAIN]
    assert ("MoEInt8" in types) == (moe == "fused") and ("MoEInt8Route" in types) == (moe == "grouped")
    assert all(all(n.input) for n in m.graph.node if n.domain == DOMAIN)
    assert quadratic_tensors(m) == []


@pytest.mark.parametrize("K, L", [(4, 37), (4, 1), (4, 2), (3, 5), (1, 6)])
def test_lower_conv_native_matches_the_kernel(K, L):
    """CausalConv1d as Concat + depthwise Conv + SiLU + Slice == the op's reference (y and state),
    including a chunk shorter than the state (L < K-1) and K = 1 (no state)."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from jambatrt.export.ops.causal_conv1d import causal_conv1d_ref
    from jambatrt.graph.passes import lower_conv_native
    B, D = 2, 24
    rng = np.random.default_rng(K * 100 + L)
    w, bias = rng.standard_normal((D, K)).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    x, st = rng.standard_normal((B, D, L)).astype(np.float32), rng.standard_normal((B, D, K - 1)).astype(np.float32)
    node = helper.make_node("CausalConv1d", ["x", "weight", "bias", "state"], ["y", "state_out"], domain=DOMAIN)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                               for n in ("x", "state")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "state_out")],
                              initializer=[numpy_helper.from_array(w, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    lowered = lower_conv_native(model, PassSettings())
    assert DOMAIN not in {n.domain for n in lowered.graph.node}
    y, s = _session(lowered.SerializeToString()).run(None, {"x": x, "state": st})
    _, s_ref = causal_conv1d_ref(*map(torch.from_numpy, (x, w, bias, st)))
    np.testing.assert_array_equal(s, s_ref.numpy())
    # y = SiLU(sum of K taps + bias): the sums in float64 and the rounding bound of K + 1 terms in any
    # order (sum_error_bound), carried through SiLU (|SiLU'| <= 1.1), plus a few ulps of SiLU itself
    from conftest import sum_error_bound
    xs = torch.from_numpy(np.concatenate([st, x], axis=2)).double()
    conv = lambda v, k, b: torch.nn.functional.conv1d(v, k.unsqueeze(1), b, groups=D)      # noqa: E731
    pre64 = conv(xs, torch.from_numpy(w).double(), torch.from_numpy(bias).double())
    abs_sum = conv(xs.abs(), torch.from_numpy(w).double().abs(), torch.from_numpy(bias).double().abs())
    want = torch.nn.functional.silu(pre64).numpy()
    bound = 1.1 * sum_error_bound(abs_sum.numpy(), K + 1) + 4 * np.finfo(np.float32).eps * np.abs(want)
    err = np.abs(y.astype(np.float64) - want)
    assert (err <= bound).all(), f"max |diff| {err.max():.3e}, worst excess {(err - bound).max():.3e}"


def test_ort_graph_lowers_conv_by_default(onnx_model):
    n_mamba = sum(n.op_type == "SelectiveScan" for n in onnx_model.graph.node)
    for conv, kernel_nodes in (("native", 0), ("kernel", n_mamba)):
        s = PassSettings(conv=conv)
        m = run_passes(onnx.ModelProto.FromString(onnx_model.SerializeToString()), s, ort_passes(s))
        assert sum(n.op_type == "CausalConv1d" for n in m.graph.node) == kernel_nodes
        assert (sum(n.op_type == "Conv" for n in m.graph.node) == n_mamba) == (conv == "native")


def test_fuse_rms_norm_lets_ort_fuse_every_norm(tmp_path, onnx_model):
    """fuse_rms_norm rewrites every exported RMSNorm (no Reciprocal left), ONNX Runtime then runs
    each as one SimplifiedLayerNormalization, and a norm's output equals the float64 RMSNorm within
    the rounding of its H-long sum of squares (relative, halved by the sqrt) plus a few roundings."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from conftest import sum_error_bound
    from jambatrt.graph.passes import fuse_rms_norm
    s = PassSettings()
    m = run_passes(onnx.ModelProto.FromString(onnx_model.SerializeToString()), s, ort_passes(s))
    n_norms = sum(n.op_type == "Pow" for n in onnx_model.graph.node)
    assert n_norms > 0 and not any(n.op_type == "Reciprocal" for n in m.graph.node)
    assert sum(n.op_type == "Div" for n in m.graph.node) == n_norms

    H, eps = 96, 1e-6
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, H)).astype(np.float32) * 7, rng.standard_normal(H).astype(np.float32)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32 if name != "axes" else np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]), helper.make_node("ReduceMean", ["p", "axes"], ["m"]),
             helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["x", "r"], ["n"]),
             helper.make_node("Mul", ["w", "n"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, H])],
                              initializer=[c("two", 2.0), c("axes", [-1]), c("eps", eps), c("w", w)])
    model = fuse_rms_norm(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), s)
    assert [n.op_type for n in model.graph.node] == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["SimplifiedLayerNormalization"]
    x64 = x.astype(np.float64)
    want = w * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps)
    bound = np.abs(want) * (sum_error_bound(1.0, H) / 2 + 8 * np.finfo(np.float32).eps)
    assert (np.abs(y - want) <= bound).all(), np.abs(y - want).max()
