"""Quantizing the course GPT: int8, int4 and NF4 weights against float32, and what QAT wins back.

    python benchmarks/quantization.py                                # the full comparison, a few minutes on 2 cores
    python benchmarks/quantization.py --steps 2 --eval-batches 1     # a smoke run (figures then mean nothing)

Loads the chapter-05 course checkpoint and measures, in the same run, on one fixed set of validation
batches (``utils.train.evaluate`` with seed 0):

* float32: validation loss and the bytes of every tensor of the state dict (the tied embedding once);
* post-training quantization with ``utils.quant.quantize_model`` (round to nearest, packed codes,
  float16 scales; the tied embedding and head stay float32): int8 per channel, int4 with groups of
  64 and 32, NF4 with groups of 64, int4 per channel and ternary. Each line prints the loss and size
  ratios against float32;
* quantization-aware training: three fine-tunes from the checkpoint on the same batches with the same
  schedule: float32 (the control: the checkpoint is not fully trained, so any extra training lowers
  the loss), int4 per channel, int4 with groups of 64 and ternary (BitNet b1.58 absmean) with the
  quantizer in the forward pass and straight-through gradients. The gap recovered is ``1 - (QAT - control) / (PTQ - float32)``, with
  the QAT and PTQ losses both measured on the real quantized models.

The goals of chapter 09 are checked and reported as met or not met: int8 within 1% of float32; int4
with groups of 32 or 64 within 5%, at most 0.16x the float32 bytes; QAT recovering at least half of
each int4 gap and of the ternary gap.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from utils import quant
from utils.device import pick, set_seed
from utils.train import COURSE_TRAINING, corpus_tensors, course_model, evaluate, train

PTQ_SETTINGS = [("int8", None), ("int4", 64), ("int4", 32), ("nf4", 64), ("int4", None), ("ternary", None)]
QAT_SETTINGS = [("int4 per channel", "int4", None), ("int4 group 64", "int4", 64), ("ternary (b1.58)", "ternary", None)]


def describe(scheme: str, group_size: int | None) -> str:
    if scheme == "ternary":
        return "ternary, per tensor"
    return f"{scheme}, {'per channel' if group_size is None else f'group {group_size}'}"


def verdict(met: bool) -> str:
    return "goal met" if met else "GOAL NOT MET"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=50, help="validation batches (fixed seed)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each QAT run")
    parser.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch size")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak fine-tuning learning rate (cosine to a tenth)")
    args = parser.parse_args()

    device = pick()
    train_data, val_data, _ = corpus_tensors()
    model, _ = course_model(device)

    def val_loss(candidate) -> float:
        return evaluate(candidate, val_data, args.eval_batch_size, args.eval_batches, seed=0)

    start = time.perf_counter()
    fp32_loss, fp32_bytes = val_loss(model), quant.storage_bytes(model)
    tokens = args.eval_batches * args.eval_batch_size * model.config.context_length
    print(f"float32: validation loss {fp32_loss:.4f} on {tokens:,} tokens, {fp32_bytes:,} bytes", flush=True)

    ptq, goals = {}, []
    for scheme, group_size in PTQ_SETTINGS:
        quantized = quant.quantize_model(model, scheme, group_size)
        loss, size = val_loss(quantized), quant.storage_bytes(quantized)
        ptq[(scheme, group_size)] = loss
        print(f"PTQ {describe(scheme, group_size):>22}: validation loss {loss:.4f} "
              f"(loss ratio {loss / fp32_loss:.4f} against float32), {size:,} bytes "
              f"(size ratio {size / fp32_bytes:.3f})", flush=True)
        if (scheme, group_size) == ("int8", None):
            goals.append(("int8 per channel within 1% of float32", loss / fp32_loss <= 1.01))
        elif scheme == "int4" and group_size in (32, 64):
            goals.append((f"int4 group {group_size} within 5% of float32 and at most 0.16x its bytes",
                          loss / fp32_loss <= 1.05 and size / fp32_bytes <= 0.16))

    config = replace(COURSE_TRAINING, batch_size=args.batch_size, max_steps=args.steps, max_lr=args.lr,
                     min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10), eval_interval=args.steps,
                     eval_batches=1, seed=7)
    set_seed(0)
    control = copy.deepcopy(model)
    train(control, train_data, val_data, config, device=device, progress=False)
    control_loss = val_loss(control)
    print(f"float32 control, fine-tuned {args.steps} steps × {args.batch_size}: validation loss {control_loss:.4f}",
          flush=True)
    for label, scheme, group_size in QAT_SETTINGS:
        set_seed(0)
        trainee = quant.prepare_qat(model, scheme, group_size)
        train(trainee, train_data, val_data, config, device=device, progress=False)
        qat_loss = val_loss(quant.quantize_model(trainee, scheme, group_size))
        ptq_loss = ptq[(scheme, group_size)]
        recovered = 1 - (qat_loss - control_loss) / (ptq_loss - fp32_loss)
        print(f"QAT {label:>16}: PTQ {ptq_loss:.4f} → QAT {qat_loss:.4f} (control {control_loss:.4f}); "
              f"gap recovered {recovered:.0%}", flush=True)
        goals.append((f"QAT recovers at least half of the {label} gap", recovered >= 0.5))

    print(f"total {time.perf_counter() - start:.0f} s")
    for goal, met in goals:
        print(f"  {verdict(met)}: {goal}")
    print(f"{sum(met for _, met in goals)} of {len(goals)} goals met")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
