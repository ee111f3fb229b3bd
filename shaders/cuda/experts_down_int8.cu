// The routed experts' down projections and their weighted combine for decode, on int8 activations
// (runtime/kernels/cuda_kernels.py ``experts_down_combine``, after int8_rows.cuh), the CUDA C twin
// of triton_moe's _down_combine_kernel with INT8:
//   out[t] = shared[t] + sum_j weights[t, j] * (down_{slot[t, j]} . h[t * K + j])
// or with SHARED (the shared expert fused) sigmoid(shared[t]) * (sd . h[T * K + t]) in place of shared[t].
// The token's K (+1) input rows are staged in shared memory; a warp owns RPW output rows and issues
// the loads of all K choices' rows before any arithmetic. Each lane sums its parts of the choices in
// order, weighted, then each row's lanes reduce once: a fixed order, no atomics.
// Constants besides int8_rows.cuh's: HIDDEN (rows), K, SHARED, WARPS, MIN_BLOCKS (blocks an SM the
// registers must allow), HOST, MAPPED, ID_T.

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
experts_down_int8(const int* __restrict__ hq, const char* __restrict__ slab, const char* __restrict__ host_slab,
                  const ID_T* __restrict__ ids, const int* __restrict__ slot_map, const float* __restrict__ weights,
                  const float* __restrict__ shared, float* __restrict__ out,
                  long long file_size, long long down_w, long long down_s, long long down_b,
                  const int4* __restrict__ sd_w, const unsigned short* __restrict__ sd_s,
                  const unsigned short* __restrict__ sd_b, int n_tok) {
    __shared__ int4 xs[(K + SHARED) * (X_WORDS / 4)];
    pdl_wait();  // the routing (ids and weights) and h come from earlier kernels
    const int t = blockIdx.x;
    // the inputs first: staged before the weights' loads measured faster on an H200 than after them
    stage_inputs(xs, hq + (long long)t * K * X_WORDS, K);
#if SHARED
    stage_inputs(xs + K * (X_WORDS / 4), hq + ((long long)n_tok * K + t) * X_WORDS, 1);
#endif

    const int l = threadIdx.x % RL;  // the lane's place in its row
    const long long row = ((long long)blockIdx.y * WARPS + (threadIdx.x >> 5)) * RPW + (threadIdx.x & 31) / RL;
    const bool in = row < HIDDEN;
    Row rows[K + SHARED];
    float wj[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const char* f = expert_file(slot_of(ids, slot_map, (long long)t * K + j), slab, host_slab, file_size);
        const bool ok = in && f != nullptr;
        f = f != nullptr ? f : slab;  // not read
        load_row(rows[j], reinterpret_cast<const int4*>(f + down_w) + row * NV,
                 reinterpret_cast<const unsigned short*>(f + down_s) + row * NG,
                 reinterpret_cast<const unsigned short*>(f + down_b) + row * NG, ok, l);
        wj[j] = weights[(long long)t * K + j];
    }
#if SHARED
    load_row(rows[K], sd_w + row * NV, sd_s + row * NG, sd_b + row * NG, in, l);
#endif
    __syncthreads();  // the input rows are in shared memory
#if SHARED
    float acc = row_dot(rows[K], xs + K * (X_WORDS / 4), l) / (1.0f + expf(-shared[t]));
#else
    float acc = 0.0f;
#endif
#pragma unroll
    for (int j = 0; j < K; ++j) acc += wj[j] * row_dot(rows[j], xs + j * (X_WORDS / 4), l);
    acc = row_sum(acc);
    if (l == 0 && in) out[(long long)t * HIDDEN + row] = SHARED ? acc : acc + shared[(long long)t * HIDDEN + row];
}
