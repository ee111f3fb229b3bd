"""The MLX backend's fused kernels (runtime/backends/mlx_kernels.py): each against a float64 numpy
formulation on fresh random inputs, for the pure-MLX-op fallback (run wherever mlx imports) and for
the Metal kernel of shaders/ (run only where MLX has a Metal GPU: skipped elsewhere, never faked).
Off Metal the shader sources are still checked: each loads, names its inputs and outputs, and
becomes an ``mx.fast.metal_kernel`` object (compiling it needs Metal).

Bounds as in tests/test_backend_ops.py: elementwise 1e-5 relative; sums within 1e-5 of the sum of
the terms' magnitudes; the delta rule's recurrence 1e-4.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from fmoe.errors import FmoeError  # noqa: E402
from fmoe.formats.quant import quantize  # noqa: E402
from fmoe.runtime.backends.mlx_backend import quant  # noqa: E402
from fmoe.runtime.backends.mlx_kernels import (  # noqa: E402
    _SIGNATURES,
    SHADERS,
    MetalKernels,
    MlxKernels,
    build_kernel,
    load_kernels,
    metal_available,
    shader_source,
)

f32 = np.float32


@pytest.fixture(params=["mlx", "metal"])
def kern(request: pytest.FixtureRequest) -> MlxKernels:
    """The fallback, and the Metal kernels where MLX has a Metal GPU."""
    if request.param == "metal":
        if not metal_available():
            pytest.skip("Metal kernels: need MLX on a Metal GPU (Apple silicon)")
        return MetalKernels()
    return MlxKernels()


def arr(x: np.ndarray) -> mx.array:
    return mx.array(np.asarray(x, dtype=f32))


def host(x: mx.array) -> np.ndarray:
    return np.array(x).astype(np.float64)


def assert_sum_close(got: np.ndarray, want: np.ndarray, magnitude: np.ndarray, bound: float = 1e-5) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want) / np.maximum(magnitude, 1e-30)
    assert err.max() < bound, err.max()


def silu64(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def rms64(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


# ---- the shader sources -------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHADERS)
def test_shader_source_loads_and_names_its_arguments(name: str) -> None:
    body = shader_source(name)
    inputs, outputs = _SIGNATURES[name]
    for arg in (*inputs, *outputs):
        assert re.search(rf"\b{arg}\b", body), f"shaders/{name}.metal never uses {arg}"
    for arg in re.findall(r"\b(\w+)_(?:shape|strides|ndim)\b", body):  # MLX provides these for inputs only
        assert arg in inputs, f"shaders/{name}.metal reads {arg}'s shape, which is not an input"
    assert build_kernel(name) is not None  # an mx.fast.metal_kernel (compiled on its first call, on Metal)


def test_kernel_sets() -> None:
    assert load_kernels("mlx").name == "mlx"
    assert load_kernels("auto").name == ("metal" if metal_available() else "mlx")
    with pytest.raises(FmoeError, match="unknown kernel set"):
        load_kernels("cuda")
    if not metal_available():
        with pytest.raises(FmoeError, match="Metal GPU"):
            load_kernels("metal")


# ---- each kernel against float64 ----------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("tokens", [1, 3])
def test_qmatmul(kern: MlxKernels, bits: int, tokens: int, rng: np.random.Generator) -> None:
    w = rng.normal(size=(67, 192)).astype(f32)  # an odd row count; three groups of 64 per row
    qt = quantize(w, bits)
    x = rng.normal(size=(tokens, 192)).astype(f32)
    got = host(kern.qmatmul(arr(x), quant(qt.weight, qt.scales, qt.biases, bits, qt.group_size)))
    d64, x64 = qt.dequantize().astype(np.float64), x.astype(np.float64)
    assert_sum_close(got, x64 @ d64.T, np.abs(x64) @ np.abs(d64).T)


def test_swiglu(kern: MlxKernels, rng: np.random.Generator) -> None:
    g = rng.normal(scale=3, size=(5, 37)).astype(f32)
    g[0, :4] = [-200, 200, -90, 90]  # exp overflows: silu stays finite
    u = rng.normal(size=(5, 37)).astype(f32)
    got = host(kern.swiglu(arr(g), arr(u)))
    np.testing.assert_allclose(got, silu64(g.astype(np.float64)) * u, rtol=1e-5, atol=1e-6)


def test_rms_norm_and_residual(kern: MlxKernels, rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, 3, 40)).astype(f32)
    y = rng.normal(size=(4, 3, 40)).astype(f32)
    w = rng.normal(1, 0.2, 40).astype(f32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    np.testing.assert_allclose(host(kern.rms_norm(arr(x), arr(w), 1e-6)), rms64(x64, w, 1e-6), rtol=1e-5, atol=1e-6)
    total, normed = kern.add_rms_norm(arr(x), arr(y), arr(w), 1e-5)
    np.testing.assert_allclose(host(total), x64 + y64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(host(normed), rms64(x64 + y64, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rope(kern: MlxKernels, rng: np.random.Generator) -> None:
    t, h, d, half = 5, 3, 24, 4  # rotary on the first 8 of 24 dims
    x = rng.normal(size=(t, h, d)).astype(f32)
    angles = rng.uniform(-100, 100, (t, half))
    cos, sin = np.cos(angles).astype(f32), np.sin(angles).astype(f32)
    got = host(kern.rope(arr(x), arr(cos), arr(sin)))
    x64 = x.astype(np.float64)
    rot = (x64[..., :half] + 1j * x64[..., half : 2 * half]) * (cos + 1j * sin).astype(np.complex128)[:, None, :]
    want = x64.copy()
    want[..., :half], want[..., half : 2 * half] = rot.real, rot.imag
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gated_delta(kern: MlxKernels, rng: np.random.Generator) -> None:
    """Value head j reads key head j // 2; a key dim above 32 (two rows per lane in the Metal kernel)."""
    t, hk, hv, dk, dv = 3, 2, 4, 40, 5
    q = rng.normal(size=(t, hk, dk)).astype(f32) / np.sqrt(dk)
    k = rng.normal(size=(t, hk, dk)).astype(f32) / np.sqrt(dk)
    v = rng.normal(size=(t, hv, dv)).astype(f32)
    g = -rng.uniform(0, 2, (t, hv)).astype(f32)
    beta = rng.uniform(0, 1, (t, hv)).astype(f32)
    s0 = rng.normal(size=(hv, dk, dv)).astype(f32)
    s64, want = s0.astype(np.float64), np.zeros((t, hv, dv))
    for i in range(t):
        for j in range(hv):
            kh = j // 2
            s64[j] *= np.exp(g[i, j])
            s64[j] += np.outer(k[i, kh], (v[i, j] - s64[j].T @ k[i, kh]) * beta[i, j])
            want[i, j] = s64[j].T @ q[i, kh]
    o, state = kern.gated_delta(*(arr(a) for a in (q, k, v, g, beta, s0)))
    np.testing.assert_allclose(host(o), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(host(state), s64, rtol=1e-4, atol=1e-5)


def test_moe_combine(kern: MlxKernels, rng: np.random.Generator) -> None:
    t, k, hidden = 4, 3, 50
    y = rng.normal(size=(t, k, hidden)).astype(f32)
    w = rng.dirichlet(np.ones(k), t).astype(f32)
    shared = rng.normal(size=(t, hidden)).astype(f32)
    got = host(kern.moe_combine(arr(y), arr(w), arr(shared)))
    terms = w[:, :, None].astype(np.float64) * y
    want = shared + terms.sum(1)
    assert_sum_close(got, want, np.abs(shared) + np.abs(terms).sum(1))
