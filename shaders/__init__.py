"""Kernel sources as package data: Metal for the MLX backend (read by fmoe/runtime/backends/mlx_kernels.py)
and, in ``cuda/``, the int8 decode kernels in CUDA C (read by fmoe/runtime/kernels/cuda_kernels.py)."""
