"""config.pbtxt, the model configuration Triton Inference Server reads (protobuf text format),
written from plain dicts: the repository's models (deploy/repository.py) and NAME_aoti
(deploy/engine_model.py) both use it."""

from __future__ import annotations

import json
import textwrap

from jambatrt.errors import ArtifactError

# dtype name (the manifest's) -> the server's model-config data_type; not Triton's kernel-language
# types (plugins/gpu TL_TYPES)
MODEL_CONFIG_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                      "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
                      "string": "TYPE_STRING"}


class Enum(str):
    """An enum value: written bare (KIND_CPU), not quoted."""


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))      # JSON string escapes are valid protobuf text-format escapes


def _inline(msg: dict) -> str | None:
    """A small message on one line ({ kind: KIND_CPU count: 1 }), or None when it has repeated messages."""
    parts = []
    for key, v in msg.items():
        if isinstance(v, dict):
            inner = _inline(v)
            if inner is None:
                return None
            parts.append(f"{key} {inner}")
        elif isinstance(v, list) and v and any(isinstance(x, dict) for x in v):
            return None
        elif isinstance(v, list):
            parts.append(f"{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            parts.append(f"{key}: {_scalar(v)}")
    return "{ " + " ".join(parts) + " }"


def pbtxt(msg: dict, indent: int = 0, width: int = 110) -> str:
    """A dict as protobuf text format: dict -> message, list of dicts -> repeated message, list of
    scalars -> repeated scalar, Enum -> bare enum value. Small messages go on one line."""
    pad = "  " * indent
    lines = []
    for key, v in msg.items():
        if isinstance(v, dict):
            inner = _inline(v)
            if inner is not None and len(pad) + len(key) + len(inner) < width:
                lines.append(f"{pad}{key} {inner}")
            else:
                lines += [f"{pad}{key} {{", pbtxt(v, indent + 1, width), f"{pad}}}"]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{key} [")
            for i, x in enumerate(v):
                comma = "," if i < len(v) - 1 else ""
                inner = _inline(x)
                if inner is not None and len(pad) + 2 + len(inner) < width:
                    lines.append(f"{pad}  {inner}{comma}")
                else:
                    lines += [f"{pad}  {{", pbtxt(x, indent + 2, width), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(v, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(line for line in lines if line)


def comment(text: str, width: int = 100) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for para in text.strip().splitlines()
                   for line in textwrap.wrap(para, width - 2, break_on_hyphens=False, break_long_words=False,
                                                 subsequent_indent="  "))


def parameters(d: dict) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in d.items() if v is not None]


def tensor(name: str, dtype: str, dims: list) -> dict:
    if dtype not in MODEL_CONFIG_TYPES:
        raise ArtifactError(f"tensor {name}: dtype {dtype!r} has no Triton type (known: {', '.join(MODEL_CONFIG_TYPES)})")
    return {"name": name, "data_type": Enum(MODEL_CONFIG_TYPES[dtype]),
            "dims": [d if isinstance(d, int) else -1 for d in dims]}      # symbolic dims (batch, seq, past+seq) -> -1
