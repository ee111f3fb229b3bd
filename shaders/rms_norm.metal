// RMSNorm of each row: out = x / sqrt(mean(x^2) + eps) * w. The seed's two passes (sum of squares,
// then apply) in one kernel: one simdgroup per row reduces with simd_sum, then scales.
//
// inputs:   x [rows, D] float32, w [D] float32, eps (0-d) float32
// outputs:  out [rows, D] float32
// launch:   grid (32, rows, 1), threadgroup (32, 1, 1)
// ---- body ----
const uint lane = thread_position_in_threadgroup.x;
const uint row = thread_position_in_grid.y;
const uint d = x_shape[1];
const device float* xr = x + size_t(row) * d;
float ss = 0.0f;
for (uint i = lane; i < d; i += 32) {
    ss = metal::fma(xr[i], xr[i], ss);
}
ss = simd_sum(ss);
const float inv = 1.0f / metal::sqrt(ss / float(d) + eps);
device float* orow = out + size_t(row) * d;
for (uint i = lane; i < d; i += 32) {
    orow[i] = xr[i] * inv * w[i];
}
