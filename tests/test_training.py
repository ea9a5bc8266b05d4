"""utils.train and utils.generate, the reference code of chapter 05: each piece on small, fast inputs."""

import math
from itertools import pairwise

import pytest
import torch

from utils import generate, train
from utils.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=11, context_length=16, n_layer=1, n_head=2, d_model=32)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


# ---------------------------------------------------------------- batches


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(100)
    x, y = train.get_batch(data, 8, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # data[i] = i, so the next token is one more
    assert int(y.max()) < len(data) - 1  # the last token is never a target (randint's exclusive bound)


def test_get_batch_is_reproducible_with_a_generator():
    data = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1))
    first = train.get_batch(data, 4, 8, torch.Generator().manual_seed(7))
    again = train.get_batch(data, 4, 8, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---------------------------------------------------------------- schedule and optimiser


def test_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    max_lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    rates = [train.learning_rate(s, max_lr, min_lr, warmup, max_steps) for s in range(max_steps + 20)]
    assert rates[0] == pytest.approx(max_lr / warmup)  # step 0 already moves
    assert rates[warmup - 1] == pytest.approx(max_lr)  # warm-up ends at the peak
    assert all(a < b for a, b in pairwise(rates[:warmup]))  # rising linearly
    assert all(a >= b for a, b in pairwise(rates[warmup:max_steps + 1]))  # then falling
    middle = (warmup + max_steps) // 2
    assert rates[middle] == pytest.approx((max_lr + min_lr) / 2)  # cosine: halfway in value at halfway in steps
    assert rates[max_steps] == pytest.approx(min_lr) and set(rates[max_steps:]) == {min_lr}


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    decay, no_decay = train.make_optimizer(model, train.TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    counted = sum(p.numel() for group in (decay, no_decay) for p in group["params"])
    assert counted == sum(p.numel() for p in model.parameters())  # tied weights counted once, none forgotten


# ---------------------------------------------------------------- the loop


def repeating_data(length: int) -> torch.Tensor:
    """A token stream with an easy pattern, so that a few steps are enough to learn something."""
    return torch.tensor([(i * 3) % TINY.vocab_size for i in range(length)])


def test_a_tiny_training_run_lowers_the_loss():
    model = tiny_model()
    data = repeating_data(2000)
    before = train.evaluate(model, data, 8, 4)
    assert before == pytest.approx(math.log(TINY.vocab_size), abs=0.3)  # at init, close to uniform guessing
    config = train.TrainConfig(batch_size=8, max_steps=40, max_lr=1e-2, min_lr=1e-3, warmup_steps=5,
                               eval_interval=20, eval_batches=4)
    history = train.train(model, data, data, config, progress=False)
    assert history.steps == [20, 40] and len(history.learning_rates) == 40
    assert history.val_loss[-1] < before / 2
    assert history.tokens_per_second > 0 and history.best_val_loss == min(history.val_loss)


def test_evaluate_uses_the_same_batches_every_call():
    model, data = tiny_model(), repeating_data(500)
    assert train.evaluate(model, data, 4, 3) == train.evaluate(model, data, 4, 3)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(seed=3)
    path = train.save_checkpoint(tmp_path / "model.pt", model, train.TrainConfig(), val_loss=1.5)
    loaded, payload = train.load_checkpoint(path)
    ids = torch.randint(0, TINY.vocab_size, (2, TINY.context_length))
    model.eval()
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert loaded.config == TINY and payload["val_loss"] == 1.5 and not loaded.training
    assert not path.with_suffix(".pt.tmp").exists()  # written atomically


def test_course_model_prefers_the_learners_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    shipped = train.save_checkpoint(tmp_path / "shipped.pt", tiny_model(seed=1), val_loss=2.0)
    monkeypatch.setattr(train, "SHIPPED_CHECKPOINT", shipped)
    _, payload = train.course_model(verbose=False)
    assert payload["val_loss"] == 2.0  # no run of the learner's yet: the shipped model

    assert train.user_checkpoint_path().is_relative_to(tmp_path / "cache")
    train.save_checkpoint(train.user_checkpoint_path(), tiny_model(seed=2), val_loss=1.0)
    _, payload = train.course_model(verbose=False)
    assert payload["val_loss"] == 1.0


def test_course_model_without_any_checkpoint_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(train, "SHIPPED_CHECKPOINT", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="python -m utils.train"):
        train.course_model(verbose=False)


# ---------------------------------------------------------------- scaling law


def test_fit_power_law_recovers_a_known_exponent():
    sizes = [1e3, 1e4, 1e5, 1e6]
    losses = [5.0 * n ** -0.3 for n in sizes]
    a, b = train.fit_power_law(sizes, losses)
    assert a == pytest.approx(5.0) and b == pytest.approx(0.3)


# ---------------------------------------------------------------- sampling


def test_temperature_scales_and_rejects_zero():
    logits = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(generate.apply_temperature(logits, 2.0), logits / 2)
    with pytest.raises(ValueError, match="positive"):
        generate.apply_temperature(logits, 0.0)


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    kept = torch.isfinite(generate.top_k_filter(logits, 2))
    assert kept.tolist() == [[True, False, True, True, False]]
    assert torch.isfinite(generate.top_k_filter(logits, 99)).all()  # k past the vocabulary keeps everything


def test_top_p_always_keeps_the_top_token_and_the_one_that_crosses_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]]))
    assert torch.isfinite(generate.top_p_filter(logits, 0.01)).sum(-1).tolist() == [1, 1]
    assert torch.isfinite(generate.top_p_filter(logits, 0.01))[1, 1]  # the top token, wherever it sits
    assert torch.isfinite(generate.top_p_filter(logits, 0.7)).tolist()[0] == [True, True, False, False]
    assert torch.isfinite(generate.top_p_filter(logits, 0.999)).all()


def test_sample_next_with_top_k_one_is_greedy():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    picked = generate.sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(1))
    assert picked.shape == (5, 1) and torch.equal(picked[:, 0], logits.argmax(-1))


def test_generate_extends_past_the_context_and_is_reproducible():
    model = tiny_model()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    new = TINY.context_length + 5  # longer than the context: the model sees a sliding window
    first = generate.generate(model, prompt, new, top_p=0.9, generator=torch.Generator().manual_seed(4))
    again = generate.generate(model, prompt, new, top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert first.shape == (1, 3 + new) and torch.equal(first, again) and torch.equal(first[:, :3], prompt)


def test_top_p_of_zero_still_keeps_one_token_to_sample():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(generate.top_p_filter(logits, 0.0)).sum(-1).tolist() == [1, 1, 1]
    picked = generate.sample_next(logits, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picked[:, 0], logits.argmax(-1))
