"""ExportedProgram -> ONNX: the jamba:: custom ops become nodes of the `jamba` domain (schemas in
graph/schemas.py); everything else is translated by torch's dynamo exporter (onnxscript)."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import onnx
import torch

from jambatrt.errors import ArtifactError
from jambatrt.export.ops import DOMAIN, DOMAIN_VERSION, SPECS
from jambatrt.graph.schemas import register_schemas

OPSET = 18


def _translation_table() -> dict:
    """torch.ops.jamba.<op> -> its translation: the `jamba` node SPEC.onnx_op_type with the op's
    tensors as inputs (SPEC.inputs order) and SPEC.attributes as attributes."""
    register_schemas()   # must precede Opset("jamba", 1): onnxscript reads the schemas then
    from onnxscript.values import Opset

    jamba = Opset(DOMAIN, DOMAIN_VERSION)
    return {getattr(torch.ops.jamba, name).default: translation(spec, getattr(jamba, spec.onnx_op_type))
            for name, spec in SPECS.items()}


def translation(spec, onnx_op):
    """A translation function for the exporter, derived from SPEC and the torch op's schema: the
    exporter reads its signature (argument names and order of the torch op; attributes annotated
    int/float, inputs unannotated, optional ones defaulting to None) to bind the op's arguments."""
    args = getattr(torch.ops.jamba, spec.name).default._schema.arguments
    inputs = [a.name for a in args if a.name not in spec.attributes]
    if len(inputs) != len(spec.inputs):
        raise ValueError(f"{spec.qualname}: {len(inputs)} tensor arguments, SPEC.inputs has {len(spec.inputs)}")
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
                                annotation=spec.attributes.get(a.name, inspect.Parameter.empty)) for a in args]

    def translate(*values, **named):
        bound = sig.bind(*values, **named)
        bound.apply_defaults()
        return onnx_op(*(bound.arguments[n] for n in inputs), **{a: bound.arguments[a] for a in spec.attributes})

    sig = inspect.Signature(params)
    translate.__signature__ = sig
    translate.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    translate.__name__ = translate.__qualname__ = spec.name
    return translate


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
    step["onnx_opset"] = {"": OPSET, DOMAIN: DOMAIN_VERSION}
    return path
