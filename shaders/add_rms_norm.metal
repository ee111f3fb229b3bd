// The residual step fused with the next norm: total = x + y, out = rms_norm(total) * w (the MoE
// output added to the residual stream and normed for the next layer in one pass, as the seed's
// combine + residual + norm).
//
// inputs:   x [rows, D] float32, y [rows, D] float32, w [D] float32, eps (0-d) float32
// outputs:  total [rows, D] float32, out [rows, D] float32
// launch:   grid (32, rows, 1), threadgroup (32, 1, 1)
// ---- body ----
const uint lane = thread_position_in_threadgroup.x;
const uint row = thread_position_in_grid.y;
const uint d = x_shape[1];
const size_t base = size_t(row) * d;
float ss = 0.0f;
for (uint i = lane; i < d; i += 32) {
    const float s = x[base + i] + y[base + i];
    total[base + i] = s;
    ss = metal::fma(s, s, ss);
}
ss = simd_sum(ss);
const float inv = 1.0f / metal::sqrt(ss / float(d) + eps);
for (uint i = lane; i < d; i += 32) {
    out[base + i] = (x[base + i] + y[base + i]) * inv * w[i];
}
