// The gated delta rule over T tokens, the state kept in registers between tokens. Value head h
// reads key head h / (Hv / Hk); per token
//     S *= exp(g);  kv = S^T k;  S += outer(k, (v - kv) * beta);  o = S^T q.
// Each simdgroup owns one column S[h, :, j]: lane l holds rows l, l + 32, ... and the two dot
// products over Dk meet in simd_sum.
//
// inputs:   q, k [T, Hk, DK] float32, v [T, Hv, Dv] float32, g, beta [T, Hv] float32,
//           state [Hv, DK, Dv] float32
// outputs:  o [T, Hv, Dv] float32, state_out [Hv, DK, Dv] float32
// template: DK (the key head dim)
// launch:   grid (32, Dv, Hv), threadgroup (32, R, 1)
// ---- body ----
constexpr int PER_LANE = (DK + 31) / 32;
const int lane = int(thread_position_in_threadgroup.x);
const int j = int(thread_position_in_grid.y);
const int h = int(thread_position_in_grid.z);
const int steps = v_shape[0];
const int hv = v_shape[1];
const int dv = v_shape[2];
const int hk = k_shape[1];
if (j >= dv) {
    return;  // the whole simdgroup: it is one column
}
const int kh = h / (hv / hk);
float s[PER_LANE];
for (int n = 0; n < PER_LANE; ++n) {
    const int i = lane + 32 * n;
    s[n] = i < DK ? state[(size_t(h) * DK + i) * dv + j] : 0.0f;
}
for (int t = 0; t < steps; ++t) {
    const float decay = metal::exp(g[t * hv + h]);
    const float b = beta[t * hv + h];
    const device float* kt = k + (size_t(t) * hk + kh) * DK;
    const device float* qt = q + (size_t(t) * hk + kh) * DK;
    float kv = 0.0f;
    for (int n = 0; n < PER_LANE; ++n) {
        const int i = lane + 32 * n;
        if (i < DK) {
            s[n] *= decay;
            kv = metal::fma(s[n], kt[i], kv);
        }
    }
    kv = simd_sum(kv);
    const float delta = (v[(size_t(t) * hv + h) * dv + j] - kv) * b;
    float acc = 0.0f;
    for (int n = 0; n < PER_LANE; ++n) {
        const int i = lane + 32 * n;
        if (i < DK) {
            s[n] = metal::fma(kt[i], delta, s[n]);
            acc = metal::fma(s[n], qt[i], acc);
        }
    }
    acc = simd_sum(acc);
    if (lane == 0) {
        o[(size_t(t) * hv + h) * dv + j] = acc;
    }
}
for (int n = 0; n < PER_LANE; ++n) {
    const int i = lane + 32 * n;
    if (i < DK) {
        state_out[(size_t(h) * DK + i) * dv + j] = s[n];
    }
}
