"""Inference from packed artifacts: model definition, expert store, backends and kernels."""
