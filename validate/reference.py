"""Eager PyTorch references an engine is graded against.

- `eager`: this package's JambaLM running the plain `<op>_ref` oracles (not the fast kernels),
  prefilling in chunks with state carried, so memory stays flat at any length.
- `hf`: Hugging Face transformers' JambaForCausalLM on the same checkpoint: an independent
  implementation. For an ExpertsInt8 artifact its expert weights are replaced by the dequantised
  int8 weights, so both sides compute the same function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jambatrt.artifact import read_manifest
from jambatrt.errors import ArtifactError, BackendUnavailable
from jambatrt.export.checkpoint import DTYPES, build_model, check_tensors, read_tensors
from jambatrt.config import JambaConfig
from jambatrt.export.quantize import dequantize_experts, quantize_experts

REFERENCES = ("eager", "hf")


def checkpoint_dir(artifact: Path, manifest: dict) -> Path:
    src = manifest["source"]["checkpoint"]
    p = Path(src) if Path(src).is_absolute() else artifact / src
    if not (p / "config.json").exists():
        raise ArtifactError(f"{artifact}: the checkpoint the artifact was exported from is gone ({p}); "
                            "the eager references need it")
    return p


class Reference:
    name = ""

    def __init__(self, artifact: str | Path, chunk: int = 8192):
        self.artifact = Path(artifact)
        self.manifest = read_manifest(self.artifact)
        self.config = JambaConfig.from_hf_dict(self.manifest["config"])
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.experts_int8 = self.manifest["quantization"]["experts"] != "none"
        self.chunk = chunk
        ckpt = checkpoint_dir(self.artifact, self.manifest)
        self.tensors = read_tensors(ckpt)
        check_tensors(self.tensors, self.config, str(ckpt))

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [B,L] -> logits [B,L,V] fp32 numpy."""
        raise NotImplementedError


class EagerReference(Reference):
    name = "eager"

    def __init__(self, artifact, chunk: int = 8192, impl: str = "ref"):
        super().__init__(artifact, chunk)
        self.model = build_model(self.config, self.tensors, self.dtype, self.experts_int8, impl=impl)

    @torch.no_grad()
    def prefill(self, input_ids):
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        state, outs = None, []
        for s in range(0, ids.shape[1], self.chunk):
            logits, state = self.model(ids[:, s:s + self.chunk], state)
            outs.append(logits.float().numpy())
        return np.concatenate(outs, axis=1)


class HFReference(Reference):
    name = "hf"

    def __init__(self, artifact, chunk: int = 8192):
        super().__init__(artifact, chunk)
        try:
            import transformers
        except ImportError:
            raise BackendUnavailable("--reference hf needs transformers (pip install 'jambatrt[test]')") from None
        import tempfile

        from jambatrt.export.checkpoint import save_checkpoint

        transformers.logging.set_verbosity_error()
        ckpt = checkpoint_dir(self.artifact, self.manifest)
        with tempfile.TemporaryDirectory() as d:
            if self.experts_int8:   # the same function as the engine: experts dequantised from int8
                tensors = dict(self.tensors)
                for k, t in tensors.items():
                    if ".experts." in k:
                        q, s = quantize_experts(t[None])
                        tensors[k] = dequantize_experts(q, s)[0]
                ckpt = save_checkpoint(self.config, tensors, Path(d) / "dequantised")
            model = transformers.JambaForCausalLM.from_pretrained(str(ckpt), dtype=self.dtype)
        self.model = model.eval()

    @torch.no_grad()
    def prefill(self, input_ids):
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        return self.model(ids).logits.float().numpy()


def make_reference(name: str, artifact, **kw) -> Reference:
    if name == "eager":
        return EagerReference(artifact, **kw)
    if name == "hf":
        return HFReference(artifact, **kw)
    raise ArtifactError(f"unknown reference {name!r} (accepted: {', '.join(REFERENCES)})")
