// The routed experts' gate and up projections with SwiGLU for decode, on int8 activations
// (runtime/kernels/cuda_kernels.py ``experts_gate_up``, after int8_rows.cuh), the CUDA C twin of
// triton_moe's _gate_up_kernel with INT8:
//   h[p] = silu(gate_p . x[p / K]) * (up_p . x[p / K])   for the routed pairs p < n_routed,
//   h[p] = silu(sg . x[p - n_routed]) * (su . x[p - n_routed])   for the shared expert's pairs after them.
// Expert files are slab rows (slots; with MAPPED, expert ids mapped by slot_map); an expert not here
// gives h = 0. A warp owns ROWS * RPW rows of both gate and up: all their loads go out before the
// arithmetic.
// Constants besides int8_rows.cuh's: INTER (rows), ROWS, WARPS, HOST, MAPPED, ID_T.

extern "C" __global__ void __launch_bounds__(WARPS * 32)
experts_gate_up_int8(const int* __restrict__ x, const char* __restrict__ slab, const char* __restrict__ host_slab,
                     const ID_T* __restrict__ ids, const int* __restrict__ slot_map, float* __restrict__ h,
                     long long file_size, long long gate_w, long long gate_s, long long gate_b,
                     long long up_w, long long up_s, long long up_b,
                     const int4* __restrict__ sg_w, const unsigned short* __restrict__ sg_s,
                     const unsigned short* __restrict__ sg_b, const int4* __restrict__ su_w,
                     const unsigned short* __restrict__ su_s, const unsigned short* __restrict__ su_b,
                     int n_routed, int k) {
    __shared__ int4 xs[X_WORDS / 4];
    pdl_wait();  // the routing (ids) and the input come from earlier kernels
    const int p = blockIdx.x;
    const bool shared = p >= n_routed;
    stage_inputs(xs, x + (long long)(shared ? p - n_routed : p / k) * X_WORDS, 1);

    const int4 *gw = sg_w, *uw = su_w;
    const unsigned short *gs = sg_s, *gb = sg_b, *us = su_s, *ub = su_b;
    bool here = true;
    if (!shared) {
        const char* f = expert_file(slot_of(ids, slot_map, p), slab, host_slab, file_size);
        here = f != nullptr;
        f = here ? f : slab;  // not read
        gw = reinterpret_cast<const int4*>(f + gate_w);
        gs = reinterpret_cast<const unsigned short*>(f + gate_s);
        gb = reinterpret_cast<const unsigned short*>(f + gate_b);
        uw = reinterpret_cast<const int4*>(f + up_w);
        us = reinterpret_cast<const unsigned short*>(f + up_s);
        ub = reinterpret_cast<const unsigned short*>(f + up_b);
    }
    const int l = threadIdx.x % RL;  // the lane's place in its rows
    const int row0 = blockIdx.y * (ROWS * RPW * WARPS) + (threadIdx.x >> 5) * (ROWS * RPW) + (threadIdx.x & 31) / RL;
    Row g[ROWS], u[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const long long row = row0 + r * RPW;
        const bool ok = here && row < INTER;
        load_row(g[r], gw + row * NV, gs + row * NG, gb + row * NG, ok, l);
        load_row(u[r], uw + row * NV, us + row * NG, ub + row * NG, ok, l);
    }
    __syncthreads();  // the input row is in shared memory
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float gv = row_sum(row_dot(g[r], xs, l));
        const float uv = row_sum(row_dot(u[r], xs, l));
        const int row = row0 + r * RPW;
        // g / (1 + exp(-g)): for very negative g, exp overflows to inf and silu is -0, as in the reference
        if (l == 0 && row < INTER) h[(long long)p * INTER + row] = gv / (1.0f + expf(-gv)) * uv;
    }
}
