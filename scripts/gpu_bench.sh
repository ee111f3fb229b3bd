#!/usr/bin/env bash
# The NVIDIA path's checks and measurements on one GPU box, in one go (docs/PERFORMANCE.md records
# the output). Correctness first: the Triton kernels (float and int8) against float64, the device
# expert tier and the CUDA-graph decode against the host path, every kernel path against float64
# and transformers, and what `--int8-dot` costs in KL on the trained reference model. Then the
# kernels (scripts/matvec_sweep.py: the matvecs' blocks against HBM, and the int8 cases' CUDA C
# kernels beside Triton's; scripts/prefill_sweep.py: the prefill GEMMs' paths and blocks;
# scripts/count_kernels.py: the launches of a decode step and of a 512-token prefill;
# scripts/host_reads_sweep.py: the expert kernels reading host memory in place against the link).
# Then the synthetic 397B (runtime/synthetic.py), each run as the issue's targets are measured,
# `--int8-dot` beside the float path: a 4-layer slice at K=10 and K=4, eager and graphed, its
# 512-token prefill with 64 experts (the llama.cpp comparison's geometry) and a layer's own time
# (scripts/layer_slope.py); the whole model at 2 bits with every expert in HBM, greedy and sampled;
# the whole model at 4 bits over HBM and page-locked host memory with `--host-reads direct`
# (uniform and Zipf routing, K=10 and K=4, after a warm-up that lets the homes settle), and copying
# misses at steady state (scripts/host_compute_sweep.py) with and without a host share.
# With LLAMA_SRC set (a llama.cpp source tree), `llama` builds it for CUDA and runs
# scripts/llama_compare.py --gpu on a 4-layer slice of the same geometry.
#
#   scripts/gpu_bench.sh OUTDIR [tests|kernels|slice|full|llama|all]   (default: all but llama)
#
# Each step's output goes to OUTDIR/<step>.txt (benchmarks: their --json result) and its tail to stdout.
# The machine needs fmoe's dependencies: on an image without msgspec or threadpoolctl, carry their
# wheels (see the device notes) and put them on PYTHONPATH first.
set -u
out=${1:?usage: scripts/gpu_bench.sh OUTDIR [tests|kernels|slice|full|llama|all]}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
P=${FMOE_PRESET:-qwen3.5-397b-a17b}  # the geometry (a preset); tiny for a dry run

step() {  # step NAME COMMAND...: run, keep the log, show its end
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$out/$name.txt" 2>&1
    echo "-- rc=$? in $((SECONDS - t0)) s"
    tail -n 30 "$out/$name.txt" | cut -c1-160
}
bench() {  # bench NAME ARGS...: fmoe bench synthetic --json, then the figures that matter
    local name=$1
    shift
    step "$name" fmoe bench synthetic "$P" "$@" --json
    python3 - "$out/$name.txt" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (ValueError, IndexError):
    sys.exit("   (no result)")
d, p, layers = r["decode"], r["prefill"], r["model"]["layers"]
ms = 1e3 * d["seconds"] / d["tokens"]
print(f"   prefill {p['tokens_per_second']:.0f} tok/s | decode {d['tokens_per_second']:.2f} tok/s, {ms:.3f} ms/token, "
      f"{ms / layers:.4f} ms/layer | HBM {r['memory_read_gb_per_s'] or 0:.0f} GB/s, link {r['link_gb_per_s'] or 0:.1f} GB/s, "
      f"ceiling {r['decode_ceiling_tok_s'] or 0:.1f} tok/s | dense {r['dense_bytes_per_token'] / 1e6:.0f} MB, "
      f"experts {r['expert_bytes_per_token'] / 1e6:.0f} MB, link {r['link_bytes_per_token'] / 1e6:.0f} MB per token")
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

if [[ $what == tests || $what == all ]]; then
    step tests python3 -P -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_triton_int8.py \
        tests/test_cuda_kernels.py tests/test_device_experts.py tests/test_kernel_sass.py tests/test_backend_ops.py -k "not mlx"
    step reference python3 scripts/backend_report.py --tokens 64 \
        --backends torch-cpu torch-cuda torch-cuda-graph torch-cuda-streamed torch-cuda-host-share
    # what --int8-dot costs on the trained reference model (the tiny synthetic one's random weights
    # amplify any rounding: backend_report's int8 row is not a quality figure)
    q=${FMOE_QUALITY_WORK:-/tmp/fmoe-int8-quality}
    step int8-quality bash -c "rm -rf '$q' && fmoe extract models/reference --out '$q' \
        && fmoe repack models/reference --out '$q' --bits 4 \
        && python3 scripts/int8_quality.py '$q' --tokens 256 --backend torch --device cuda"
fi
if [[ $what == kernels || $what == all ]]; then
    step sweep python3 scripts/matvec_sweep.py "$P" --bits 4 --int8
    step sweep-cuda-c python3 scripts/matvec_sweep.py "$P" --bits 4 --int8 --heuristic-only --cuda-c
    step prefill-sweep python3 scripts/prefill_sweep.py "$P" --tokens 512 --bits 4
    step prefill-sweep-64 python3 scripts/prefill_sweep.py "$P" --tokens 512 --bits 4 --experts 64 --int8
    step count python3 scripts/count_kernels.py "$P" --layers 4 --k 10 --int8-dot
    step count-prefill python3 scripts/count_kernels.py "$P" --layers 4 --experts 64 --int8-dot --prompt 512
    step host-reads python3 scripts/host_reads_sweep.py "$P" --k 4 10 --int8
fi
if [[ $what == slice || $what == all ]]; then
    for k in 10 4; do
        bench "slice4-k$k-eager" --layers 4 --k "$k" --bits 4 --prompt-tokens 512 --tokens 64 --timing
        bench "slice4-k$k-graph" --layers 4 --k "$k" --bits 4 --prompt-tokens 512 --tokens 64 --cuda-graph
        bench "slice4-k$k-graph-int8" --layers 4 --k "$k" --bits 4 --prompt-tokens 128 --tokens 64 --cuda-graph \
            --int8-dot
    done
    bench slice4-64experts-prefill-int8 --layers 4 --experts 64 --k 10 --bits 4 --prompt-tokens 512 --tokens 64 \
        --cuda-graph --int8-dot
    # a layer's own time (the resident-decode target's figure): 4 and 8 layers alternating, the slope
    step slope-int8 python3 scripts/layer_slope.py "$P" --rounds 2 -- --bits 4 --k 10 --prompt-tokens 128 \
        --tokens 64 --cuda-graph --int8-dot
fi
if [[ $what == full || $what == all ]]; then
    bench full-2bit-graph --bits 2 --k 10 --prompt-tokens 64 --tokens 32 --cuda-graph
    bench full-2bit-graph-int8 --bits 2 --k 10 --prompt-tokens 64 --tokens 32 --cuda-graph --int8-dot
    bench full-2bit-graph-int8-sampled --bits 2 --k 10 --prompt-tokens 64 --tokens 32 --cuda-graph --int8-dot \
        --temperature 0.6 --top-k 20 --top-p 0.95  # Qwen's generation config
    FMOE_CUDA_C=0 bench full-2bit-graph-int8-triton --bits 2 --k 10 --prompt-tokens 64 --tokens 32 --cuda-graph \
        --int8-dot
    for k in 10 4; do  # every expert at a home: a device slot or page-locked host memory read in place
        for r in uniform zipf:1.2; do
            bench "full-4bit-k$k-$r-direct-int8" --bits 4 --k "$k" --prompt-tokens 16 --tokens 32 --host-gb 16 \
                --routing "$r" --host-reads direct --warm-tokens 64 --cuda-graph --int8-dot
        done
    done
    bench full-4bit-uniform-eager --bits 4 --k 10 --prompt-tokens 16 --tokens 16 --host-gb 16 --routing uniform
    for r in uniform zipf:1.2; do
        bench "full-4bit-$r-graph" --bits 4 --k 10 --prompt-tokens 16 --tokens 16 --host-gb 16 --routing "$r" --cuda-graph
    done
    bench full-4bit-k4-uniform-graph --bits 4 --k 4 --prompt-tokens 16 --tokens 16 --host-gb 16 --routing uniform \
        --cuda-graph
    for k in 10 4; do
        step "full-4bit-k$k-steady" python3 scripts/host_compute_sweep.py "$P" --bits 4 --k "$k" --host-gb 16 \
            --routing uniform zipf:1.2 --shares off auto --rounds 2 --tokens 32 --warm-tokens 64 --cuda-graph
    done
fi
if [[ $what == llama ]]; then
    [[ -n ${LLAMA_SRC:-} ]] || { echo "error: llama: set LLAMA_SRC to a llama.cpp source tree" >&2; exit 2; }
    w=${LLAMA_WORK:-/tmp/fmoe-llama-work}  # GGUFs of several GB: not in OUTDIR
    mkdir -p "$w"
    # sm_90 only; the flash-attention kernels left out keeps the build to about 4 minutes on 16 cores
    step llama-build bash -c "cmake -S '$LLAMA_SRC' -B '$w/build' -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DGGML_CUDA_FA=OFF -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF && cmake --build '$w/build' --target llama-bench \
        llama-quantize -j $(nproc)"
    step llama-slice bash -c "fmoe synth '$w/s' --preset $P --layers 4 --experts 64 && fmoe extract '$w/s' --out '$w/p' \
        && fmoe repack '$w/s' --out '$w/p' --bits 4"
    step llama-gpu python3 scripts/llama_compare.py "$w/s" "$w/p" --llama-build "$w/build" --llama-src "$LLAMA_SRC" \
        --gpu --threads "$(nproc)" --rounds 4 --prompt-tokens 512 --tokens 64 --int8-dot --workdir "$w/gguf"
fi
