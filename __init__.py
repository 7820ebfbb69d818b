"""jambatrt: export Jamba (Mamba-Transformer-MoE) models to ONNX / TensorRT / ONNX Runtime engines,
validate them against eager PyTorch, profile them and serve them from Triton Inference Server.

Importing the package registers the `jamba::` custom ops with torch, with the CPU kernels of
plugins/cpu as their CPU implementation (numba loads on first use), after setting how OpenMP's
threads wait between kernels (threads.py)."""

__version__ = "0.1.0"

from jambatrt.threads import set_omp_env as _set_omp_env  # noqa: E402

_set_omp_env()   # before torch loads libgomp (threads.py)

from jambatrt.export import ops as _ops  # noqa: E402,F401  (registers torch.ops.jamba.*)
from jambatrt.plugins.cpu import register_torch_kernels as _register_cpu  # noqa: E402

_register_cpu()   # the fast CPU kernels implement the ops on CPU; `<op>_ref` stays the oracle
