// Shared by fmoe's CUDA C decode kernels on int8 activations (runtime/kernels/cuda_kernels.py prepends
// it to each kernel's source): a warp's loads of whole packed rows, and their dot products with an int8
// input row held in shared memory.
//
// W: int32 words [rows, NW], codes of BITS bits low bits first; scales and biases bfloat16 [rows, NG].
// An int8 input row as runtime/kernels/triton_int8.py writes it (int32 words): J = 8 / BITS lane rows
// [J, NW] (entry [j, w], byte b: the input of word w's code b * J + j), then the NG group steps dx and
// the NG group sums of x as float32 bits, padded to 16 bytes (X_WORDS words in all).
//
//   W[r] . x = sum_g scale[r, g] * dx[g] * sum(q[r, g, :] * xq[g, :]) + bias[r, g] * xsum[g]
//
// RL lanes own a row (32, or the power of two that covers a shorter row's vectors, so that a warp
// reads RPW = 32 / RL rows at once instead of leaving lanes idle); lane l of a row (l = lane % RL) owns
// its 16-byte vectors v = l + RL i (VPL of them). A vector lies inside one group (GS * BITS a multiple
// of 128), and the lane holding a group's first vector adds its bias term.
// Compile-time constants (nvrtc -D): BITS (2, 4, 8), GS, NW (words a row, a multiple of 4), X_WORDS,
// RL (runtime/kernels/cuda_kernels.py's row_lanes), XJ (the staged row's lane rows: J, or 2 for a row
// made for 4-bit matrices of the same groups, read by 8-bit or 2-bit ones: input_lanes).

#ifndef HOST
#define HOST 0  // whether negative slots below -1 are host slab rows
#endif
#ifndef MAPPED
#define MAPPED 0  // whether ids are expert ids (mapped to slots by slot_map) or slots
#endif
#ifndef PDL
#define PDL 0  // launched with programmatic dependent launch (runtime/kernels/pdl.py)
#endif
#ifndef ID_T
#define ID_T long long  // the ids' type
#endif

#define J (8 / BITS)
#ifndef XJ
#define XJ J
#endif
#define WPG (GS * BITS / 32)
#define NG (NW / WPG)
#ifndef RL
#define RL 32  // lanes a row
#endif
#define NV (NW / 4)
#define VPL ((NV + RL - 1) / RL)
#define RPW (32 / RL)  // rows a warp reads at once

__device__ __forceinline__ int dp4a_us(unsigned int codes, int x, int acc) {
    int d;  // four unsigned 8-bit codes times four signed int8 inputs, added to acc
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(codes), "r"(x), "r"(acc));
    return d;
}

__device__ __forceinline__ unsigned int code_lanes(unsigned int word, int j) {
    // code b * J + j of the word in byte b: at 4 bits codes 0, 2, 4, 6 (j = 0) or 1, 3, 5, 7 (j = 1)
    if (BITS == 8) return word;
    const unsigned int mask = BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
    return (word >> (j * BITS)) & mask;
}

__device__ __forceinline__ float bf16_to_float(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

struct Row {  // a lane's share of one packed row, in registers
    int4 words[VPL];
    float scale[VPL];
    float bias[VPL];
};

// Issue the lane's loads of a row (ok false: zeros, nothing read). The weights are read once: streamed
// past L1 (ld.global.cs); scales and biases through the read-only path.
__device__ __forceinline__ void load_row(Row& row, const int4* __restrict__ w, const unsigned short* __restrict__ s,
                                         const unsigned short* __restrict__ b, bool ok, int l) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int v = l + RL * i;
        const bool in = ok && v < NV;
        const int g = (v * 4) / WPG;
        row.words[i] = in ? __ldcs(w + v) : make_int4(0, 0, 0, 0);
        row.scale[i] = in ? bf16_to_float(__ldg(s + g)) : 0.0f;
        row.bias[i] = in && (v * 4) % WPG == 0 ? bf16_to_float(__ldg(b + g)) : 0.0f;
    }
}

// The inputs that lane row j of vector v multiplies (four words, byte b of word i for code b J + j of
// the vector's word i). With XJ 2 and BITS 8 or 2 the row was made for 4-bit matrices (entry [j', w']
// byte b' = input 8 w' + 2 b' + j'; the same groups, so the same steps and sums, which J * NW = N / 4
// words start at in either layout): its bytes are gathered, as the other op's launch would have made
// them for these matrices, by byte permutes.
__device__ __forceinline__ int4 input_lanes(const int4* xs, int j, int v) {
#if XJ == J
    return xs[j * NV + v];
#elif BITS == 8 && XJ == 2
    // word W = 4 v + i takes inputs 4 W .. 4 W + 3: bytes 0, 1 (half 0) or 2, 3 (half 1) of the 4-bit
    // row's word W / 2, alternately from its lane rows 0 and 1
    const int2* x2 = reinterpret_cast<const int2*>(xs);
    const int2 a = x2[v], c = x2[NV + v];  // 4-bit words 2v, 2v + 1 of lane rows 0 and 1 (a row: N / 8 words)
    return make_int4(__byte_perm(a.x, c.x, 0x5140), __byte_perm(a.x, c.x, 0x7362),
                     __byte_perm(a.y, c.y, 0x5140), __byte_perm(a.y, c.y, 0x7362));
#elif BITS == 2 && XJ == 2
    // lane row j of word W takes inputs 16 W + 4 b + j: bytes j / 2 and 2 + j / 2 of the 4-bit row's words
    // 2 W and 2 W + 1 in its lane row j % 2
    const int4 a = xs[(j & 1) * 2 * NV + 2 * v], c = xs[(j & 1) * 2 * NV + 2 * v + 1];  // 4-bit words 8v ..
    const unsigned int sel = j < 2 ? 0x6420u : 0x7531u;
    return make_int4(__byte_perm(a.x, a.y, sel), __byte_perm(a.z, a.w, sel),
                     __byte_perm(c.x, c.y, sel), __byte_perm(c.z, c.w, sel));
#else
#error "XJ: a row of another layout is read only by 8-bit or 2-bit matrices from a 4-bit one"
#endif
}

// Lane l's part of W[r] . x for the input row at xs (shared memory, X_WORDS words).
__device__ __forceinline__ float row_dot(const Row& row, const int4* xs, int l) {
    const int* xw = reinterpret_cast<const int*>(xs);
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int v = l + RL * i;
        if (v >= NV) continue;  // only where NV is not a multiple of RL
        const int g = (v * 4) / WPG;
        int isum = 0;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int4 xj = input_lanes(xs, j, v);
            isum = dp4a_us(code_lanes((unsigned int)row.words[i].x, j), xj.x, isum);
            isum = dp4a_us(code_lanes((unsigned int)row.words[i].y, j), xj.y, isum);
            isum = dp4a_us(code_lanes((unsigned int)row.words[i].z, j), xj.z, isum);
            isum = dp4a_us(code_lanes((unsigned int)row.words[i].w, j), xj.w, isum);
        }
        acc += (float)isum * (row.scale[i] * __int_as_float(xw[J * NW + g])) + row.bias[i] * __int_as_float(xw[J * NW + NG + g]);
    }
    return acc;
}

// With PDL: let the next kernel launch, then wait until the previous one has finished and its writes
// are visible (as runtime/kernels/pdl.py's pdl_start); nothing a previous kernel writes may be read before.
__device__ __forceinline__ void pdl_wait() {
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The sum of a over each row's RL lanes (every lane of the warp takes part), in every lane of the row.
__device__ __forceinline__ float row_sum(float a) {
#pragma unroll
    for (int off = RL / 2; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
    return a;
}

// Copy `rows` input rows of X_WORDS words from x into shared memory (the whole block).
__device__ __forceinline__ void stage_inputs(int4* xs, const int* __restrict__ x, int rows) {
    const int4* xv = reinterpret_cast<const int4*>(x);
    for (int i = threadIdx.x; i < rows * (X_WORDS / 4); i += blockDim.x) xs[i] = xv[i];
}

// Where an expert lives: its file's first byte in the device slab (slot >= 0) or, with HOST, in the
// page-locked host slab read over the link (slot <= -2: row -2 - slot); null where it is not here
// (slot -1: computed elsewhere).
__device__ __forceinline__ const char* expert_file(long long slot, const char* slab, const char* host_slab,
                                                   long long file_size) {
    if (slot >= 0) return slab + slot * file_size;
    if (HOST && slot <= -2) return host_slab + (-2 - slot) * file_size;
    return nullptr;
}

__device__ __forceinline__ long long slot_of(const ID_T* __restrict__ ids, const int* __restrict__ slot_map, long long i) {
    const long long id = ids[i];
    return MAPPED ? (long long)slot_map[id] : id;  // MAPPED: ids are expert ids, slot_map their slots
}
