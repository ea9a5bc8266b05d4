"""Training the course GPT on character-level Shakespeare, against nanoGPT's published CPU configuration.

    python benchmarks/training.py                 # chapter 05's default settings, then the nanoGPT baseline
    python benchmarks/training.py --steps 50      # a quick smoke run (figures then mean nothing)
    python benchmarks/training.py --preset gpu    # nanoGPT's GPU configuration, time to validation loss 1.47

Both runs use the same corpus (the first 1.1M characters, 90/10 split, vocabulary 77), the same
training loop (utils.train.train) and the same final evaluation: the mean loss over a fixed set
of validation batches, larger than the loop's running evaluations so the figure is stable. The
script prints validation loss, wall time and tokens per second of each, and the ratios between them.
The baseline is nanoGPT's `train_shakespeare_char` CPU command: 4 layers, 4 heads, 128 dims,
context 64, batch 12, 2000 iterations, learning rate 1e-3 to 1e-4, LayerNorm, GELU, learned positions.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from utils.device import pick, set_seed
from utils.model import GPT, GPTConfig
from utils.train import COURSE_MODEL, COURSE_TRAINING, TrainConfig, corpus_tensors, evaluate, train

NANOGPT_CPU = (
    GPTConfig(vocab_size=77, context_length=64, n_layer=4, n_head=4, d_model=128, mlp="gelu", norm="layernorm",
              position="learned", bias=False),
    TrainConfig(batch_size=12, max_steps=2000, max_lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1,
                beta2=0.99, grad_clip=1.0, eval_interval=250, eval_batches=20),
)
NANOGPT_GPU = (
    GPTConfig(vocab_size=77, context_length=256, n_layer=6, n_head=6, d_model=384, mlp="gelu", norm="layernorm",
              position="learned", bias=False, dropout=0.2),
    TrainConfig(batch_size=64, max_steps=5000, max_lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1,
                beta2=0.99, grad_clip=1.0, eval_interval=250, eval_batches=20),
)
FINAL_EVAL_BATCHES = 100  # x batch 32: about 200k-400k validation tokens for the reported figure


def run(name: str, model_config: GPTConfig, train_config: TrainConfig, data, device, target=None) -> dict:
    train_data, val_data = data
    set_seed(train_config.seed)
    model = GPT(model_config)
    start = time.perf_counter()
    history = train(model, train_data, val_data, train_config, device=device, stop_at_val_loss=target)
    seconds = time.perf_counter() - start
    val_loss = evaluate(model, val_data, 32, FINAL_EVAL_BATCHES, seed=1)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name}: {parameters / 1e6:.2f}M parameters, {len(history.learning_rates)} steps, "
          f"validation loss {val_loss:.4f}, {seconds:.1f} s, {history.tokens_per_second:,.0f} tokens/s", flush=True)
    return {"val_loss": val_loss, "seconds": seconds, "tokens_per_second": history.tokens_per_second,
            "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override both runs' step counts (smoke tests)")
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--no-baseline", action="store_true", help="only the course's default run")
    args = parser.parse_args()

    device = pick()
    train_data, val_data, _ = corpus_tensors()
    data = (train_data, val_data)
    torch.set_float32_matmul_precision("high")

    if args.preset == "gpu":
        model_config, train_config = NANOGPT_GPU
        if args.steps:
            train_config = replace(train_config, max_steps=args.steps)
        result = run("nanoGPT GPU configuration", model_config, train_config, data, device, target=1.47)
        history = result["history"]
        reached = [s for s, v in zip(history.seconds, history.val_loss) if v <= 1.47]
        print(f"time to validation loss 1.47: {reached[0]:.1f} s" if reached else
              f"validation loss 1.47 not reached (best {history.best_val_loss:.4f})")
        return

    course_train = replace(COURSE_TRAINING, max_steps=args.steps) if args.steps else COURSE_TRAINING
    course = run("course default (chapter 05)", COURSE_MODEL, course_train, data, device)
    if args.no_baseline:
        return
    model_config, train_config = NANOGPT_CPU
    if args.steps:
        train_config = replace(train_config, max_steps=args.steps)
    baseline = run("nanoGPT CPU configuration", model_config, train_config, data, device)
    print(f"validation loss: course {course['val_loss']:.4f} vs nanoGPT config {baseline['val_loss']:.4f} "
          f"({baseline['val_loss'] - course['val_loss']:+.4f} in the course's favour)")
    history = course["history"]
    in_time = [(s, v) for s, v in zip(history.seconds, history.val_loss) if s <= baseline["seconds"]]
    if in_time:
        seconds, loss = in_time[-1]
        print(f"in the baseline's wall time: the course run's loop evaluation at {seconds:.0f} s read {loss:.4f}")
    print(f"wall time: course {course['seconds']:.0f} s vs {baseline['seconds']:.0f} s "
          f"(ratio {course['seconds'] / baseline['seconds']:.2f}); throughput ratio "
          f"{course['tokens_per_second'] / baseline['tokens_per_second']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
