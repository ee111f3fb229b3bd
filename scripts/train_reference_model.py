"""Train fmoe's reference model: a small Qwen3.5-MoE (transformers' ``Qwen3_5MoeForCausalLM``, both
layer types, 32 experts top-4) with a byte-level BPE tokenizer trained by ``tokenizers``, on the
Python standard library's own source files (PSF licence), written in the official release layout.

Two stages, so the corpus and tokenizer can be made on one machine and the training run on a GPU:

    # everything on one machine (the corpus: this interpreter's standard library)
    python scripts/train_reference_model.py all --work work-ref --out models/reference --device cuda

    # as models/reference was made (docs/QUALITY.md): prepare on the dev box (CPython 3.11.7), train on the H200
    python scripts/train_reference_model.py prepare --work work-ref
    python scripts/train_reference_model.py train --work work-ref --out models/reference --device cuda --budget-s 330

``prepare`` writes ``WORK/``: the tokenizer files, the token ids of the training and held-out files
(uint16 ``.npy``, files separated by ``<|endoftext|>``), ``heldout.txt`` and ``corpus.json`` (which
files, which Python). The held-out files are chosen by a hash of their path (about 1 in 40).
``train`` needs only torch, transformers, numpy and safetensors; it is seeded, logs the loss curve,
measures the held-out perplexity and writes ``OUT/`` (bf16 safetensors shards, config.json,
tokenizer files, chat template, generation_config.json, training.json, heldout.txt).
``--steps auto`` times the first steps and picks the step count that fits ``--budget-s``; the count
is recorded, and ``--steps N`` repeats the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

# ---- the model ------------------------------------------------------------------------------------
VOCAB_SIZE = 4096  # 4070 BPE tokens + Qwen's 26 added tokens at 4070..4095
TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_5_moe_text",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,  # a multiple of fmoe's group size 64 (expert input dims)
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "moe_intermediate_size": 64,  # a multiple of 64 (down_proj's input dim)
    "shared_expert_intermediate_size": 256,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.01,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [3, 3, 2],  # rotary dim 16: 8 frequencies (text positions make the split moot)
        "mrope_interleaved": True,
    },
    "mtp_num_hidden_layers": 0,
}

# ---- the corpus -----------------------------------------------------------------------------------
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings", "turtledemo"}
MAX_FILE_BYTES = 400_000
HELDOUT_ONE_IN = 40  # crc32(relative path) % 40 == 0: held out


def stdlib_files(root: Path) -> list[tuple[str, str]]:
    """``(relative path, text)`` of the standard library's ``.py`` files, sorted by path: all of them
    (the test suite too) except site-packages, caches, encoding tables, pydoc's topic dump,
    machine-specific sysconfig data, files over 400 kB and files that are not UTF-8."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata") or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELDOUT_ONE_IN == 0


def prepare(work: Path, stdlib: Path, version: str) -> dict[str, Any]:
    """Corpus, tokenizer and token ids into ``work``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from fmoe.convert.synth_tokenizer import (
        ADDED_TOKENS,
        CHAT_TEMPLATE,
        TokenizerIds,
        generation_config,
        tokenizer_config,
    )

    files = stdlib_files(stdlib)
    if len(files) < 100:
        raise SystemExit(f"error: {stdlib}: only {len(files)} Python files; is it a standard library folder?")
    train = [(r, t) for r, t in files if not is_heldout(r)]
    heldout = [(r, t) for r, t in files if is_heldout(r)]
    work.mkdir(parents=True, exist_ok=True)

    special_base = VOCAB_SIZE - len(ADDED_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=special_base,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator((t for _, t in train), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) != special_base:
        raise SystemExit(f"error: the BPE has {len(vocab)} tokens, expected {special_base}")
    added = []
    for i, (content, special) in enumerate(ADDED_TOKENS):  # Qwen's added tokens at the top of the vocabulary
        vocab[content] = special_base + i
        added.append(
            {
                "id": special_base + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
        )
    data["added_tokens"] = added
    (work / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    ids = TokenizerIds(special_base)
    (work / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(ids, TEXT_CONFIG["max_position_embeddings"]), indent=1)
    )
    (work / "generation_config.json").write_text(json.dumps(generation_config(ids), indent=1))
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    counts = {}
    for name, part in (("train", train), ("heldout", heldout)):
        encoded = tok.encode_batch([t for _, t in part], add_special_tokens=False)
        stream = []
        for e in encoded:
            stream.extend(e.ids)
            stream.append(ids.endoftext)  # files separated by <|endoftext|>
        arr = np.asarray(stream, dtype=np.uint16)
        np.save(work / f"tokens-{name}.npy", arr)
        counts[name] = {"files": len(part), "bytes": sum(len(t.encode()) for _, t in part), "tokens": int(arr.size)}
    (work / "heldout.txt").write_text("".join(f"# ---- Lib/{r} ----\n{t}" for r, t in heldout))
    corpus = {
        "corpus": f"CPython {version} standard library (Lib/), *.py",
        "python": version,
        "rule": f"every .py under Lib/ except dirs {sorted(EXCLUDED_DIRS)} and config-*, _sysconfigdata*, "
        f"files over {MAX_FILE_BYTES} bytes or not UTF-8; held out: crc32(path) % {HELDOUT_ONE_IN} == 0",
        "special_base": special_base,
        "endoftext": ids.endoftext,
        **counts,
        "heldout_files": [r for r, _ in heldout],
    }
    (work / "corpus.json").write_text(json.dumps(corpus, indent=1))
    return corpus


# ---- training -------------------------------------------------------------------------------------
def build_model(seed: int, experts_impl: str) -> Any:
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    cfg = Qwen3_5MoeTextConfig(**{k: v for k, v in TEXT_CONFIG.items() if k != "model_type"})
    cfg.eos_token_id = None
    return Qwen3_5MoeForCausalLM._from_config(cfg, experts_implementation=experts_impl)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_loss(model: Any, heldout: Any, seq_len: int, batch: int, max_windows: int | None = None) -> float:
    """Mean next-token cross entropy (nats) over non-overlapping windows of the held-out stream,
    every position of each window scored."""
    import torch

    n = (heldout.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(heldout.device.type, dtype=torch.bfloat16):
        for i in range(0, n, batch):
            starts = torch.arange(i, min(n, i + batch), device=heldout.device) * seq_len
            idx = starts[:, None] + torch.arange(seq_len + 1, device=heldout.device)
            w = heldout[idx]
            logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += w[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def train(work: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    t_start = time.time()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls autocast leaves (none of the big ones)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    corpus = json.loads((work / "corpus.json").read_text())
    tokens = torch.from_numpy(np.load(work / "tokens-train.npy").astype(np.int64)).to(device)
    heldout = torch.from_numpy(np.load(work / "tokens-heldout.npy").astype(np.int64)).to(device)
    model = build_model(args.seed, args.experts_impl).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    span = tokens.numel() - args.seq_len - 1
    coef = float(model.config.router_aux_loss_coef)
    log: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    total = args.steps if args.steps != "auto" else None
    cal0, cal1 = 10, 30  # steps timed for --steps auto (after the first ones' start-up costs)
    t_train = t_cal = time.time()
    step = 0
    print(
        f"model: {n_params / 1e6:.2f} M parameters; train tokens {tokens.numel()}, held-out {heldout.numel()}",
        flush=True,
    )
    while total is None or step < int(total):
        if total is None and step in (cal0, cal1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == cal0:
                t_cal = time.time()
            else:
                per_step = (time.time() - t_cal) / (cal1 - cal0)
                remaining = args.budget_s - (time.time() - t_train)
                total = cal1 + max(1, int(remaining / (per_step * 1.04)))  # 4%: the held-out evals
                print(f"calibrated: {per_step * 1000:.0f} ms/step -> {total} steps", flush=True)
        lr = lr_at(step, int(total) if total is not None else 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, span, (args.batch,), generator=gen).to(device)
        w = tokens[starts[:, None] + torch.arange(args.seq_len, device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16):  # labels = inputs: transformers shifts them
            outp = model(input_ids=w, labels=w, output_router_logits=True, use_cache=False)
        loss = outp.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if step % args.log_every == 0 or step == int(total or 0) - 1:
            aux = outp.aux_loss.item()
            entry = {
                "step": step,
                "loss": loss.item() - coef * aux,
                "aux": aux,
                "lr": lr,
                "grad_norm": float(gnorm),
                "seconds": round(time.time() - t_train, 2),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            hl = heldout_loss(model, heldout, args.seq_len, args.batch, max_windows=64)
            evals.append({"step": step, "heldout_loss": hl})
            print(json.dumps(evals[-1]), flush=True)
        step += 1
    train_seconds = time.time() - t_train
    final = heldout_loss(model, heldout, args.seq_len, args.batch)
    evals.append({"step": step, "heldout_loss": final})
    print(f"held-out: loss {final:.4f} nats/token, perplexity {math.exp(final):.3f}", flush=True)
    record = {
        "command": shlex.join(["python", "scripts/train_reference_model.py", *sys.argv[1:]]),
        "machine": args.machine or platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "seed": args.seed,
        "steps": step,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_seen": step * args.batch * args.seq_len,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "router_aux_loss_coef": coef,
        "experts_implementation": args.experts_impl,
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "heldout": {
            "tokens": int(heldout.numel()),
            "windows_of": args.seq_len,
            "loss": final,
            "perplexity": math.exp(final),
        },
        "corpus": {k: v for k, v in corpus.items() if k != "heldout_files"},
        "loss_curve": log,
        "heldout_curve": evals,
    }
    export(model, work, out, record)
    return record


# ---- the official release layout -------------------------------------------------------------------
SHARD_BYTES = 12_000_000  # two shards (a lent GPU machine sends back files of at most 16 MiB)


def export(model: Any, work: Path, out: Path, record: dict[str, Any]) -> None:
    """bf16 safetensors in official names (``model.language_model.*``, fused experts, A_log F32),
    sharded with an index, the nested config, the tokenizer files and the training record."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        official = (
            "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name.removeprefix("model.")
        )
        dtype = torch.float32 if name.endswith("A_log") else torch.bfloat16
        tensors[official] = p.detach().to("cpu", dtype).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    special_base = record["corpus"]["special_base"]
    text = {**TEXT_CONFIG, "eos_token_id": record["corpus"]["endoftext"], "dtype": "bfloat16"}
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "image_token_id": special_base + 12,
        "video_token_id": special_base + 13,
        "vision_start_token_id": special_base + 9,
        "vision_end_token_id": special_base + 10,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "fmoe_reference": {"trained_on": record["corpus"]["corpus"], "seed": record["seed"], "steps": record["steps"]},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "heldout.txt",
    ):
        shutil.copyfile(work / name, out / name)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("prepare", "train", "all"))
    ap.add_argument("--work", type=Path, default=Path("work-ref"), help="corpus, tokenizer and token ids")
    ap.add_argument("--out", type=Path, default=Path("models/reference"), help="the checkpoint (train, all)")
    ap.add_argument("--stdlib", type=Path, default=None, help="a Lib/ folder (default: this interpreter's)")
    ap.add_argument("--python-version", default=None, help="the version of --stdlib's Python (required with it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="auto", help="optimizer steps, or auto: as many as fit --budget-s")
    ap.add_argument("--budget-s", type=float, default=330.0, help="training time for --steps auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--experts-impl", default="eager", help="transformers' experts implementation")
    ap.add_argument("--machine", default=None, help="a name for the machine, recorded")
    args = ap.parse_args(argv)
    if args.steps != "auto":
        args.steps = int(args.steps)
    if args.stage in ("prepare", "all"):
        if args.stdlib is None:
            stdlib, version = Path(sysconfig.get_paths()["stdlib"]), platform.python_version()
        elif args.python_version is None:
            raise SystemExit("error: --stdlib needs --python-version (it is recorded with the model)")
        else:
            stdlib, version = args.stdlib, args.python_version
        corpus = prepare(args.work, stdlib, version)
        print(json.dumps({k: v for k, v in corpus.items() if k != "heldout_files"}, indent=1))
    if args.stage in ("train", "all"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        record = train(args.work, args.out, args)
        print(json.dumps({k: v for k, v in record.items() if not k.endswith("curve")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
