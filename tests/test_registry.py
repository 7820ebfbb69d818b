"""The op registry against the test rows: every op has every target and a row; every registered
implementation has cases, every row's cases an implementation (tests/op_test_data.py)."""

import pytest

from jambatrt.export.ops import SPECS
from jambatrt.plugins.registry import TARGETS, implementation, implementations, implements, session_op, session_ops
from op_test_data import ROWS, SESSION_ROWS


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_op_has_every_target(target):
    impls = implementations(target)
    assert set(impls) == set(SPECS), f"{target}: missing {sorted(set(SPECS) - set(impls))}"
    for op, (own, *variants) in impls.items():
        assert not own.variant and all(v.variant for v in variants), (target, op)
        assert implementation(target, op) is own


def test_every_op_has_a_row_and_every_row_an_op():
    assert set(ROWS) == set(SPECS)
    for op, row in ROWS.items():
        assert row.cases and set(row.ort) <= set(row.cases), op


def test_every_session_op_has_a_row_and_every_row_a_session_op():
    """The ORT engine's own ops (lowering targets and the forms bound outside the graph) register
    beside their kernels; each needs its row in SESSION_ROWS, and a row needs its op."""
    ops = session_ops()
    assert set(ops) == set(SESSION_ROWS)
    for op_type, op in ops.items():
        assert op.op_type == op_type and callable(op.out_shapes) and op.inputs and op.outputs, op_type
        assert not set(ops) & {s.onnx_op_type for s in SPECS.values()}, "a session op shadows a jamba op"


def test_every_gpu_launcher_has_interpreter_cases():
    """A launcher without cases, or cases naming no launcher, fail: a new kernel needs its row."""
    for op, impls in implementations("gpu", variants=True).items():
        names = {i.name for i in impls}
        assert names == set(ROWS[op].interpreter), (f"{op}: launchers without interpreter cases "
                                                     f"{sorted(names - set(ROWS[op].interpreter))}, cases naming "
                                                     f"no launcher {sorted(set(ROWS[op].interpreter) - names)}")
        assert all(ROWS[op].interpreter[i.name] for i in impls), op


def test_registered_extras_are_complete():
    """What each target's users read from a registration: the ORT bodies' error shapes, the GPU
    launchers' traceable twins, traced kernels and AOT variants, the TensorRT plugins' descriptors."""
    for op, (impl, *_) in implementations("ort").items():
        assert callable(impl.extra["out_shapes"]), op
    for op, (impl, *_) in implementations("gpu").items():
        assert callable(impl.extra["traceable"]) and impl.extra["kernels"] and callable(impl.extra["aot"]), op
    for op, (impl, *_) in implementations("tensorrt").items():
        assert [d.op for d in impl.extra["descriptors"]][0] == op, op


def test_registry_refuses_a_second_own_implementation(monkeypatch):
    from jambatrt.plugins import registry
    monkeypatch.setattr(registry, "_IMPLEMENTATIONS", dict(registry._IMPLEMENTATIONS))   # nothing stays
    implements("registry_test_op", "cpu")(lambda: None)
    with pytest.raises(ValueError, match="two cpu implementations"):
        def other():
            pass
        implements("registry_test_op", "cpu")(other)
    with pytest.raises(ValueError, match="unknown target"):
        implements("registry_test_op", "cuda")
    with pytest.raises(LookupError, match="no ort implementation"):
        implementation("ort", "registry_test_op")
    monkeypatch.setattr(registry, "_SESSION_OPS", dict(registry._SESSION_OPS))
    session_op("RegistryTestOp", inputs=("float32",), out_shapes=lambda x: [x.shape])(other)
    with pytest.raises(ValueError, match="session op RegistryTestOp is registered twice"):
        session_op("RegistryTestOp", inputs=("float32",), out_shapes=lambda x: [x.shape])(lambda x: x)
