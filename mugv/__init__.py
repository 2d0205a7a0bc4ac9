"""mugv: a lean model, training and inference stack for MUG-V-class video diffusion
transformers (arXiv 2510.17519), built on the fused ops of :mod:`mugv_kernels`."""

__version__ = "0.1.0"
