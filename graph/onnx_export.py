"""ExportedProgram -> ONNX: the jamba:: custom ops become nodes of the `jamba` domain (schemas in
graph/schemas.py); everything else is translated by torch's dynamo exporter (onnxscript)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from jambatrt.errors import ArtifactError
from jambatrt.graph.schemas import register_schemas

OPSET = 18


def _translation_table() -> dict:
    register_schemas()   # must precede Opset("jamba", 1): onnxscript reads the schemas then
    from onnxscript.values import Opset

    jamba = Opset("jamba", 1)

    def causal_conv1d(x, weight, bias, state=None):
        return jamba.CausalConv1d(x, weight, bias, state)

    def selective_scan(u, delta, A, Bm, Cm, Dskip, z=None, delta_bias=None, state=None):
        return jamba.SelectiveScan(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state)

    def moe_int8(x, router_logits, w13, w13_scale, w2, w2_scale, top_k: int, expert_offset: int = 0):
        return jamba.MoEInt8(x, router_logits, w13, w13_scale, w2, w2_scale, top_k=top_k, expert_offset=expert_offset)

    def attention(q, k, v, past_k=None, past_v=None):
        return jamba.CausalAttention(q, k, v, past_k, past_v)

    ops = torch.ops.jamba
    return {ops.causal_conv1d.default: causal_conv1d, ops.selective_scan.default: selective_scan,
            ops.moe_int8.default: moe_int8, ops.attention.default: attention}


def to_onnx(ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str],
            weights: Path | None = None):
    """The step ExportedProgram (input_ids, state list) as an in-memory ONNX model (onnx_ir). Dims are
    named batch / seq / past.

    weights: the artifact's weight store. Then `ep` may hold fake weights (export/trace.py
    fake_model): every initializer becomes a reference into the store (external data at the
    tensor's byte offset), so the graph is built and saved without reading or copying a weight.
    Without it the initializers keep the program's (real) tensors."""
    state_dyn = [{0: "batch", 1: "past"} if n.endswith((".k", ".v")) else {0: "batch"} for n in input_names[1:]]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)   # e.g. "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)          # "axis name ... will not be used"
        prog = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=_translation_table(),
                                 opset_version=OPSET, input_names=input_names, output_names=output_names,
                                 dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "state": state_dyn},
                                 optimize=False, verbose=False)
    model = prog.model
    weight_names = bind_store(model, weights) if weights is not None else set()
    _optimize(model, weight_names)
    return model


def bind_store(model, weights: Path) -> set[str]:
    """Point every initializer of `model` (onnx_ir) at its tensor in the safetensors store `weights`
    (location relative to the model's directory, which must hold the store). -> their names."""
    import onnx_ir as ir

    from jambatrt.export.store import read_header
    from jambatrt.export.weights import PROGRAM_PREFIX

    entries, _ = read_header(weights)
    bound = set()
    for name, value in model.graph.initializers.items():
        key = name.removeprefix(PROGRAM_PREFIX)
        if key not in entries and key == "lm_head.weight":
            key = "model.embed_tokens.weight"          # tied: stored once
        info = entries.get(key)
        if info is None:
            raise ArtifactError(f"ONNX initializer {name} has no tensor in {weights}")
        if list(value.shape) != info["shape"]:
            raise ArtifactError(f"ONNX initializer {name} {list(value.shape)} vs {info['shape']} in {weights}")
        value.const_value = ir.ExternalTensor(weights.name, info["offset"], info["nbytes"], value.dtype,
                                              shape=ir.Shape(info["shape"]), name=name, base_dir=weights.parent)
        bound.add(name)
    return bound


def _optimize(model, weights: set[str]) -> None:
    """onnxscript's optimizer, except that nothing computed from a weight is folded into a new
    constant: the weights stay in the store, read by reference, and the graph is the same at every
    model size (small test presets would otherwise get folded copies that large models do not)."""
    import onnxscript.optimizer

    def should_fold(node):
        return False if any(v is not None and v.name in weights for v in node.inputs) else None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


def save_onnx(model: onnx.ModelProto, path: Path, size_threshold: int = 1024) -> None:
    """Save with weights as external data (one file beside the model); works past 2 GB."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=size_threshold, convert_attribute=False)
    if data.exists():
        data.chmod(path.stat().st_mode & 0o777)   # the writer makes it 0600; match the model file


def load_onnx(path: Path, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        if load_external_data:
            from onnx.external_data_helper import ExternalDataInfo, uses_external_data
            locations = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
            missing = [loc for loc in sorted(locations) if not (path.parent / loc).is_file()]
            if missing:
                raise ArtifactError(f"{path}: missing external data file(s) {', '.join(missing)}")
            onnx.load_external_data_for_model(model, str(path.parent))
        return model
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: missing ONNX file or its external data ({e})") from None
    except Exception as e:   # protobuf DecodeError and friends
        raise ArtifactError(f"{path}: unreadable ONNX model ({type(e).__name__}: {e})") from None


def check(model_path: Path) -> None:
    """onnx.checker (full, with our schemas registered) on the saved model."""
    register_schemas()
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ArtifactError(f"{model_path}: ONNX check failed: {e}") from None


def write_onnx(ep: torch.export.ExportedProgram, out_dir: Path, manifest: dict, weights: Path) -> Path:
    """Write out_dir/model.onnx, its initializers pointing into the store `weights` (which lives in
    out_dir), and record it in the manifest's step program."""
    import onnx_ir as ir

    step = manifest["programs"]["step"]
    model = to_onnx(ep, [i["name"] for i in step["inputs"]], [o["name"] for o in step["outputs"]], weights=weights)
    path = Path(out_dir) / "model.onnx"
    ir.save(model, path)        # external tensors are saved as references, not rewritten
    check(path)
    step["onnx"] = "model.onnx"
    step["onnx_opset"] = {"": OPSET, "jamba": 1}
    return path
