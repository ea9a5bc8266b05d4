"""Real weights in the course's own blocks, offline: MiniLM (a BERT encoder) and a small random GPT-2.

The course model must reproduce the `transformers` implementation to 1e-4; that is chapter 04's
claim that the from-scratch blocks are the real thing.
"""

import pytest
import torch

from utils import data, model, pretrained

SENTENCES = [
    "The cat sits on the mat.",
    "Stock markets fell sharply after the announcement, and then recovered by noon.",
    "Hi",
    "Mix the flour with eggs and milk to make the batter.",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        hf_model, tokenizer = pretrained.load_minilm()
    except data.CorpusUnavailable as error:  # no cache and no registry: nothing to compare against
        pytest.skip(f"MiniLM unavailable: {error}")
    return hf_model, tokenizer, pretrained.course_model_from_bert(hf_model)


def test_minilm_config_and_parameters(minilm):
    hf_model, _, course = minilm
    config = course.config
    assert (config.n_layer, config.n_head, config.d_model) == (6, 12, 384)
    assert not config.causal and not config.prenorm and config.norm == "layernorm"
    pooler = sum(p.numel() for p in hf_model.pooler.parameters()) if hf_model.pooler is not None else 0
    assert model.count_parameters(course)["total"] == sum(p.numel() for p in hf_model.parameters()) - pooler


def test_minilm_hidden_states_match_transformers_with_padding(minilm):
    hf_model, tokenizer, course = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    assert not real.all(), "the batch must contain padding, or the attention mask goes untested"
    with torch.no_grad():
        reference = hf_model(**batch, output_hidden_states=True, output_attentions=True)
    ours = course.inspect(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert len(ours["hidden_states"]) == len(reference.hidden_states) == 7
    for layer, (mine, theirs) in enumerate(zip(ours["hidden_states"], reference.hidden_states)):
        difference = (mine - theirs).abs()
        assert difference[real].max() < 1e-4, f"layer {layer}: {difference[real].max():.2e} at real tokens"
        # Padding positions carry no meaning and amplify float32 rounding, but a wrong mask would show here too.
        assert difference.max() < 1e-3, f"layer {layer}: {difference.max():.2e} at padding positions"
    for layer, (mine, theirs) in enumerate(zip(ours["attentions"], reference.attentions)):
        difference = (mine - theirs).abs()[real[:, None, :, None].expand_as(mine)]
        assert difference.max() < 1e-4, f"attention of layer {layer}: {difference.max():.2e}"


def test_minilm_forward_without_inspect_matches_too(minilm):
    """The fused attention path (used for training) gives the same last hidden state."""
    hf_model, tokenizer, course = minilm
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf_model(**batch).last_hidden_state
        x = course.embed(batch["input_ids"], batch["token_type_ids"])
        mask = batch["attention_mask"].bool()[:, None, None, :]
        for block in course.blocks:
            x = block(x, mask)
    real = batch["attention_mask"].bool()
    assert (x - theirs).abs()[real].max() < 1e-4


def small_random_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    # transformers initialises norms to 1 and biases to 0: randomise everything, so that a bias or a
    # norm copied to the wrong place cannot go unnoticed.
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.2 * torch.randn_like(parameter))
    return hf_model


def test_gpt2_conversion_matches_logits_offline():
    hf_model = small_random_gpt2()
    course = pretrained.course_model_from_gpt2(hf_model)
    assert course.lm_head.weight is course.token_embedding.weight
    assert model.count_parameters(course)["total"] == sum(p.numel() for p in hf_model.parameters())
    ids = torch.randint(0, 50, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf_model(ids).logits
        ours, _ = course(ids)
        inspected = course.inspect(ids)["hidden_states"]
    assert theirs.abs().max() > 1.0, "the logits should be large enough for the comparison to mean something"
    assert (ours - theirs).abs().max() < 1e-4
    # inspect() takes the explicit attention path; the final hidden state, through the final norm and the head, agrees too.
    assert (course.lm_head(course.final_norm(inspected[-1])) - theirs).abs().max() < 1e-4


def test_gpt2_conversion_is_causal():
    hf_model = small_random_gpt2(seed=2)
    course = pretrained.course_model_from_gpt2(hf_model)
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    with torch.no_grad():
        before, _ = course(ids)
        after, _ = course(changed)
    assert torch.equal(before[:, :10], after[:, :10]), "a later token changed an earlier position's logits"
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_load_gpt2_returns_none_with_one_line_when_offline(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    assert pretrained.load_gpt2() is None
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("GPT-2 skipped") and "\n" not in printed
