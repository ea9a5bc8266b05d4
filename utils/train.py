"""Training the course GPT (chapter 05): batches, schedule, AdamW, clipping, evaluation, checkpoints.

``train()`` is the loop chapter 05 builds step by step; ``course_model()`` hands chapters 07-10
the chapter-05 model without retraining: the learner's own full-length run if there is one,
otherwise the checkpoint that ships with the course (made by ``python -m utils.train``, with the
same settings and seed, so it is the model the chapter would produce).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import QUICK
from .device import autocast
from .model import GPT, GPTConfig


@dataclass
class TrainConfig:
    """The optimisation settings of a run; the defaults are chapter 05's."""

    batch_size: int = 32
    max_steps: int = 700  # 700 x 32 x 128 = 2.9M tokens: about 2.5 minutes on 2 CPU cores
    max_lr: float = 4e-3  # small models with RMSNorm tolerate (and need) a larger rate than GPT-2's 6e-4
    min_lr: float = 4e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    seed: int = 1337


# The chapter-05 model: pre-norm, RMSNorm, SwiGLU, rotary positions, tied embeddings.
COURSE_MODEL = GPTConfig(vocab_size=77, context_length=128, n_layer=4, n_head=4, d_model=128)
COURSE_TRAINING = TrainConfig()


# ---------------------------------------------------------------- data


def get_batch(data: torch.Tensor, batch_size: int, context_length: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``context_length`` tokens and the same windows shifted by one (chapter 05).

    Every position of every window is a training example: predict token t+1 from tokens 0..t.
    """
    starts = torch.randint(len(data) - context_length - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + context_length] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + context_length] for s in starts.tolist()])
    return x, y


# ---------------------------------------------------------------- schedule and optimiser


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to ``max_lr``, then a cosine decay to ``min_lr`` at ``max_steps`` (chapter 05).

    Warm-up lets AdamW's second-moment estimates settle before big steps; the cosine tail lets
    the model settle into a minimum that large steps would keep jumping over.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms' gains and biases only hurts (chapter 05)."""
    decay, no_decay = [], []
    for parameter in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.max_lr, betas=(config.beta1, config.beta2))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimiser keeps between steps (AdamW: two per trainable parameter; chapter 10)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean cross-entropy over ``batches`` fixed random batches of ``data`` (same batches every call)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, batch_size, model.config.context_length, generator)
        losses.append(model(x.to(device), y.to(device))[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- the loop


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
               grad_clip: float, device: torch.device | str = "cpu") -> tuple[float, float]:
    """One optimisation step: set the rate, forward, backward, clip, update (chapter 05).

    Returns the loss and the gradient norm *before* clipping. Clipping rescales the whole
    gradient when its norm exceeds ``grad_clip`` (0 turns it off): the direction is kept, one
    unlucky batch just cannot take a huge step.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device):
        _, loss = model(x.to(device), y.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    return loss.item(), float(grad_norm)


@dataclass
class History:
    """What a run measured: losses at evaluation points, learning rate per step, speed."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean training loss since the last evaluation
    val_loss: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # per step, before clipping
    seconds: list[float] = field(default_factory=list)  # wall time at each evaluation
    tokens_per_second: float = 0.0
    optimizer_state_bytes: int = 0  # AdamW's two moments per trainable parameter, measured at the end (chapter 10)

    @property
    def best_val_loss(self) -> float:
        return min(self.val_loss) if self.val_loss else float("nan")


def train(model: GPT, train_data: torch.Tensor, val_data: torch.Tensor, config: TrainConfig,
          device: torch.device | str = "cpu", progress: bool = True, stop_at_val_loss: float | None = None) -> History:
    """Train ``model`` in place for ``config.max_steps`` steps; evaluate every ``eval_interval`` (chapter 05).

    ``stop_at_val_loss`` ends the run at the first evaluation at or below it (benchmarks use it
    to measure the time to a target loss).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    history = History()
    context = model.config.context_length
    running, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(range(config.max_steps), desc="training", disable=not progress, mininterval=1.0)
    for step in bar:
        lr = learning_rate(step, config.max_lr, config.min_lr, config.warmup_steps, config.max_steps)
        x, y = get_batch(train_data, config.batch_size, context, generator)
        loss, grad_norm = train_step(model, optimizer, x, y, lr, config.grad_clip, device)
        history.learning_rates.append(lr)
        history.grad_norms.append(grad_norm)
        running, count = running + loss, count + 1
        last = step == config.max_steps - 1
        if (step + 1) % config.eval_interval == 0 or last:
            val = evaluate(model, val_data, config.batch_size, config.eval_batches)
            history.steps.append(step + 1)
            history.train_loss.append(running / count)
            history.val_loss.append(val)
            history.seconds.append(time.perf_counter() - start)
            running, count = 0.0, 0
            bar.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{val:.3f}")
            if stop_at_val_loss is not None and val <= stop_at_val_loss:
                break
    elapsed = time.perf_counter() - start
    history.tokens_per_second = len(history.learning_rates) * config.batch_size * context / max(elapsed, 1e-9)
    history.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    model.eval()
    return history


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, model: GPT, train_config: TrainConfig | None = None, **extra) -> Path:
    """Weights plus the configs that rebuild the model, written atomically (chapter 05)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    payload = {"model_config": asdict(model.config), "state_dict": state,
               "train_config": asdict(train_config) if train_config else None, **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model a checkpoint describes; returns ``(model in eval mode, the whole checkpoint dict)``."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "course_gpt.pt"


def user_checkpoint_path() -> Path:
    """Where chapter 05 saves the learner's own full-length run (the course cache, never the course files)."""
    from .data import cache_dir

    return cache_dir() / "checkpoints" / "course_gpt.pt"


def course_model(device: torch.device | str = "cpu", verbose: bool = True) -> tuple[GPT, dict]:
    """The chapter-05 model for chapters 07-10: the learner's own run if complete, else the shipped one."""
    for path, what in ((user_checkpoint_path(), "your chapter-05 run"), (SHIPPED_CHECKPOINT, "the course's checkpoint")):
        if path.exists():
            model, payload = load_checkpoint(path, device)
            if verbose:
                print(f"Course model: {what} ({path}), validation loss {payload.get('val_loss', float('nan')):.3f}")
            return model, payload
    raise FileNotFoundError(f"No course checkpoint: {SHIPPED_CHECKPOINT} is missing; run `python -m utils.train`.")


def fit_power_law(sizes, losses) -> tuple[float, float]:
    """Fit ``loss = a · size^(-b)`` by least squares on log-log axes; returns ``(a, b)`` (chapter 05)."""
    x = torch.log(torch.as_tensor(sizes, dtype=torch.float64))
    y = torch.log(torch.as_tensor(losses, dtype=torch.float64))
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    intercept = y.mean() - slope * x.mean()
    return float(torch.exp(intercept)), float(-slope)


def corpus_tensors() -> tuple[torch.Tensor, torch.Tensor, "CharTokenizer"]:  # noqa: F821
    """The character-level corpus as token tensors: ``(train, val, tokenizer)`` with the 90/10 split."""
    from .data import load_shakespeare, train_val_split
    from .tokenizers import CharTokenizer

    text = load_shakespeare(verbose=False)
    tokenizer = CharTokenizer.train(text)
    train_text, val_text = train_val_split(text, 0.1)
    return token_tensor(tokenizer, train_text), token_tensor(tokenizer, val_text), tokenizer


def token_tensor(tokenizer, text: str) -> torch.Tensor:
    """``text`` as a 1-D ``long`` tensor of the tokenizer's ids."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def main() -> None:
    """``python -m utils.train``: train the course model with chapter 05's settings and ship it."""
    import argparse

    from .device import pick, set_seed

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=SHIPPED_CHECKPOINT)
    parser.add_argument("--steps", type=int, default=COURSE_TRAINING.max_steps)
    args = parser.parse_args()
    set_seed(COURSE_TRAINING.seed)
    train_data, val_data, tokenizer = corpus_tensors()
    model = GPT(COURSE_MODEL)
    config = TrainConfig(**{**asdict(COURSE_TRAINING), "max_steps": args.steps})
    history = train(model, train_data, val_data, config, device=pick())
    save_checkpoint(args.out, model, config, val_loss=history.val_loss[-1], vocab=tokenizer.vocab,
                    seconds=history.seconds[-1], quick=QUICK)
    print(f"validation loss {history.val_loss[-1]:.4f} after {config.max_steps} steps, "
          f"{history.seconds[-1]:.0f} s, {history.tokens_per_second:,.0f} tokens/s → {args.out}")


if __name__ == "__main__":
    main()
