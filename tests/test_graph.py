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
    save_onnx(onnx_model, path, size_threshold=16)
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
