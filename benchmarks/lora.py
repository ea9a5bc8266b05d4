"""Fine-tuning the course GPT on a new domain: full fine-tuning against LoRA, DoRA and QLoRA.

    python benchmarks/lora.py                                      # the full comparison, about 6 minutes on 2 cores
    python benchmarks/lora.py --steps 2 --eval-batches 1 --batch-size 2   # a smoke run (figures then mean nothing)

Loads the chapter-05 course checkpoint and fine-tunes fresh copies of it on chapter 10's new domain,
Python's reference documentation (``pydoc_data``, shipped with Python), with chapter 05's training loop
(``utils.lora.finetune``: the same batches, schedule and steps for every method, the rates of
``utils.lora.LEARNING_RATES``). Each run reports the trainable share of the parameters, AdamW's state in
bytes (measured from the optimizer), the validation loss on the new domain and on the old one
(Shakespeare: forgetting), and time; all losses are on the same fixed batches (seed 0).

Methods: full fine-tuning (the baseline of the ratios); LoRA rank 8 on all seven projections of each
block; LoRA rank 8 on query and value only (the LoRA paper's placement); DoRA rank 8; QLoRA rank 8 on the
NF4 base of chapter 09.

The goals of chapter 10 are checked and reported as met or not met:

* rank-8 LoRA trains under 1% of the parameters *and* ends within 5% of full fine-tuning's loss on the
  new domain (checked for each placement; the share of a rank-r adapter on a d × d matrix is 2r/d, so
  the course model's width, 128, decides the first half: the benchmark prints the width at which
  rank 8 on query and value would fall under 1%);
* QLoRA's frozen base takes at most 0.2x the bytes of the float32 base.
"""

from __future__ import annotations

import argparse

import torch

from utils import lora, quant
from utils.device import pick, set_seed
from utils.train import corpus_tensors, course_model

RUNS = [
    ("full", "full", {}),
    ("LoRA r=8, all projections", "lora", {"rank": 8}),
    ("LoRA r=8, query+value", "lora", {"rank": 8, "targets": lora.QUERY_VALUE}),
    ("DoRA r=8, all projections", "dora", {"rank": 8}),
    ("QLoRA r=8, all projections (NF4 base)", "qlora", {"rank": 8}),
]


def verdict(met: bool) -> str:
    return "goal met" if met else "GOAL NOT MET"


def width_for_query_value_share(model, rank: int, target: float) -> int:
    """The smallest width d (multiple of 64) at which rank-r adapters on query and value train under ``target``.

    The model is scaled in width only (same depth and vocabulary); its parameters are counted from a real
    instance of the course's GPT at that width.
    """
    from dataclasses import replace

    from utils.model import GPT

    for width in range(128, 4097, 64):
        config = replace(model.config, d_model=width, n_head=max(1, width // 32))
        with torch.device("meta"):
            total = sum(p.numel() for p in GPT(config).parameters())
        adapters = config.n_layer * 2 * rank * 2 * width
        if adapters / (total + adapters) < target:
            return width
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps of every run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches of each domain (fixed seed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick(verbose=False)
    base, _ = course_model(device, verbose=False)
    _, old_val, tokenizer = corpus_tensors()
    new_train, new_val = lora.domain_tensors(tokenizer)
    print(f"course model: {sum(p.numel() for p in base.parameters()):,} parameters, width {base.config.d_model}; "
          f"device {device}, {torch.get_num_threads()} threads")
    print(f"new domain: {len(new_train):,} training characters; {args.steps} steps × {args.batch_size} × "
          f"{base.config.context_length} tokens per run; evaluation on {args.eval_batches} batches per domain\n")

    results = {}
    header = f"{'method':40s} {'trainable':>10s} {'share':>7s} {'AdamW':>9s} {'new domain':>16s} {'old domain':>16s} {'time':>7s}"
    print(header)
    for label, method, options in RUNS:
        set_seed(0)
        model = lora.prepare(base, method, **options)
        config = lora.finetune_config(method, args.steps, args.batch_size, args.eval_batches)
        result = lora.finetune(model, label, new_train, new_val, old_val, config, device=device, progress=False)
        results[label] = result
        print(f"{label:40s} {result.trainable:>10,} {result.fraction:>7.2%} {result.optimizer_state_bytes / 1e6:>7.2f}MB "
              f"{result.new_domain_before:>7.3f} → {result.new_domain_after:.3f} "
              f"{result.old_domain_before:>7.3f} → {result.old_domain_after:.3f} {result.seconds:>6.1f}s", flush=True)

    full = results["full"]
    print("\nagainst full fine-tuning (same run):")
    for label, result in results.items():
        if label != "full":
            print(f"  {label:40s} new-domain loss ratio {result.new_domain_after / full.new_domain_after:.4f}, "
                  f"AdamW state ratio {result.optimizer_state_bytes / full.optimizer_state_bytes:.4f}, "
                  f"time ratio {result.seconds / full.seconds:.2f}")

    fp32_bytes = quant.storage_bytes(base)
    qlora = results["QLoRA r=8, all projections (NF4 base)"]
    print(f"\nfrozen base: float32 {fp32_bytes:,} bytes, QLoRA's NF4 {qlora.base_bytes:,} bytes "
          f"(ratio {qlora.base_bytes / fp32_bytes:.3f})")
    width = width_for_query_value_share(base, 8, 0.01)
    print(f"rank 8 on query and value falls under 1% of the parameters from width {width} "
          f"(this model: {base.config.d_model}); all seven projections need a far wider model")

    goals = []
    for label in ("LoRA r=8, all projections", "LoRA r=8, query+value"):
        result = results[label]
        ratio = result.new_domain_after / full.new_domain_after
        goal = (f"{label}: under 1% of the parameters ({result.fraction:.2%}) and within 5% of full "
                f"fine-tuning's new-domain loss (ratio {ratio:.3f})")
        goals.append((goal, result.fraction < 0.01 and ratio <= 1.05))
    goals.append((f"QLoRA's frozen base at most 0.2x the float32 bytes ({qlora.base_bytes / fp32_bytes:.3f}x)",
                  qlora.base_bytes <= 0.2 * fp32_bytes))
    print("\ngoals:")
    for goal, met in goals:
        print(f"  {verdict(met)}: {goal}")
    print(f"{sum(met for _, met in goals)} of {len(goals)} goals met "
          f"(the first two are alternatives: either placement meeting it meets the chapter's goal)")


if __name__ == "__main__":
    main()
