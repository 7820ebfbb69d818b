"""jambatrt: export Jamba (Mamba-Transformer-MoE) models to ONNX / TensorRT / ONNX Runtime engines,
validate them against eager PyTorch, profile them and serve them from Triton Inference Server.

Importing the package registers the `jamba::` custom ops with torch."""

__version__ = "0.1.0"

from jambatrt.export import ops as _ops  # noqa: E402,F401  (registers torch.ops.jamba.*)
