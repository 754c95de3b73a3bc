"""imaml_ext: implicit MAML for PyTorch with fused C++/CUDA kernels."""

from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
