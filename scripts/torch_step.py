#!/usr/bin/env python3
"""One full Qwen2 training step in PyTorch + transformers (eager), timed like the Rust bench.

The work of `cargo bench -p qwen2 --bench step` (see `qwen2::bench`): a random-init
`Qwen2ForCausalLM` of hidden 512, 8 heads over 2 key/value heads, MLP 1408, vocabulary 4096,
untied head, f32 on the CPU; random tokens without padding, labels = inputs (shifted inside the
loss); forward, backward, global gradient-norm clipping to 1.0, AdamW (lr 1e-4, weight decay
0.1 on matrices only). `--mode recompute` turns on transformers' gradient checkpointing
(`gradient_checkpointing_enable`, called `activation_checkpointing_enable` since transformers
5; non-reentrant), which recomputes every layer.

Prints one line, `ROW {json}`, with the median step time and phases over the measured steps,
the resident bytes added by the forward, and the process's peak RSS. Run by
`scripts/bench-vs-torch.sh`; not part of CI.
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def rss_bytes() -> int:
    """Resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--mode", choices=["none", "recompute"], default="none")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(1234)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=0.0,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.train()
    if args.mode == "recompute":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-4,
    )
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)

    total, forward, backward, opt, held = [], [], [], [], []
    loss_value = float("nan")
    for i in range(args.warmup + args.steps):
        before = rss_bytes()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        after_forward = rss_bytes() - before
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        loss_value = loss.item()
        del loss
        if i < args.warmup:
            continue
        total.append((t3 - t0) * 1e3)
        forward.append((t1 - t0) * 1e3)
        backward.append((t2 - t1) * 1e3)
        opt.append((t3 - t2) * 1e3)
        held.append(after_forward)

    row = {
        "impl": "torch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "mode": args.mode,
        "step_ms": statistics.median(total),
        "forward_ms": statistics.median(forward),
        "backward_ms": statistics.median(backward),
        "optimizer_ms": statistics.median(opt),
        "rss_added_by_forward": max(held),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_loss": loss_value,
    }
    print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
