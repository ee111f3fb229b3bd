"""Metal sources of the MLX backend's fused kernels (read by fmoe/runtime/backends/mlx_kernels.py)."""
