"""Looking inside a trained transformer (chapter 06).

Four tools, each small enough to read in one sitting:

* **head scores**: how much of a head's attention goes to the previous token, to itself, to the
  first token ([CLS]), to [SEP] or to punctuation, averaged over the queries
  (``previous_token_score``, ``attention_to``, ``head_scores``, ``classify_heads``);
* **attention rollout** (Abnar & Zuidema, 2020): how much each input token can have reached each
  position of the last layer, through the attention maps of every layer and the residual stream
  (``attention_rollout``);
* **gradient × input saliency**: how much each input token's embedding pushes one output logit up
  or down, to first order (``gradient_times_input``, ``as_function_of_embeddings``);
* **a linear probe**: what a hidden state encodes, measured by how well a linear map read off it
  predicts a label (``fit_linear_probe``, ``probe_accuracy``).

They work on any model that returns attention weights and hidden states: the course's GPT
(:meth:`utils.model.GPT.inspect`) and a Hugging Face model loaded with ``attn_implementation="eager"``
(``attention_maps`` hides the difference). The pictures of the same things live in :mod:`utils.viz`.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import torch
from torch import nn

# ---------------------------------------------------------------- getting the attention maps


@torch.no_grad()
def attention_maps(model: nn.Module, ids: torch.Tensor, **inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(attentions, hidden_states)`` of one forward pass: L maps ``(B, H, T, T)`` and L + 1 states ``(B, T, d)``.

    The course's GPT reports them through ``inspect``; a ``transformers`` model through
    ``output_attentions`` (load it with ``attn_implementation="eager"``: SDPA returns none).
    ``inputs`` go to the model as keyword arguments (``attention_mask``, ``token_type_ids``).
    """
    if hasattr(model, "inspect"):
        found = model.inspect(ids, **inputs)
        return list(found["attentions"]), list(found["hidden_states"])
    output = model(input_ids=ids, output_attentions=True, output_hidden_states=True, **inputs)
    if not output.attentions or output.attentions[0] is None:
        raise ValueError("the model returned no attention weights: load it with attn_implementation='eager'.")
    return list(output.attentions), list(output.hidden_states)


# ---------------------------------------------------------------- what a head attends to


def previous_token_score(weights: torch.Tensor) -> torch.Tensor:
    """The mean weight each query puts on the token just before it: ``(..., T, T)`` → ``(...)`` (chapter 06, exercise 1).

    Query 0 has no previous token, so the mean runs over the T - 1 queries 1..T-1; the weights sit
    on the first diagonal below the main one. A score near 1 marks a *previous-token head*.
    """
    return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).mean(-1)


def self_score(weights: torch.Tensor) -> torch.Tensor:
    """The mean weight each query puts on itself: the main diagonal, ``(..., T, T)`` → ``(...)``."""
    return torch.diagonal(weights, dim1=-2, dim2=-1).mean(-1)


def next_token_score(weights: torch.Tensor) -> torch.Tensor:
    """The mean weight on the token just after each query (0 in a causal model): ``(..., T, T)`` → ``(...)``."""
    return torch.diagonal(weights, offset=1, dim1=-2, dim2=-1).mean(-1)


def attention_to(weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The total weight on the keys where ``keys`` (a ``(T,)`` bool mask) is True, averaged over queries.

    ``(..., T, T)`` → ``(...)``. With ``keys`` marking [CLS], [SEP] or punctuation it measures how
    much of a head's attention parks on those tokens.
    """
    return weights[..., keys.to(weights.device)].sum(-1).mean(-1)


def is_punctuation(token: str) -> bool:
    """A token made only of punctuation characters (``,`` ``.`` ``;`` ``!``...), not [CLS]/[SEP] or a space."""
    return bool(token) and not (token.startswith("[") and token.endswith("]")) and all(
        character in string.punctuation for character in token)


def head_scores(attentions: Sequence[torch.Tensor], tokens: Sequence[str]) -> dict[str, torch.Tensor]:
    """Scores of every head for the common patterns: a dict of ``(L, H)`` tensors.

    ``attentions`` holds L maps of shape ``(H, T, T)`` or ``(1, H, T, T)``; ``tokens`` the T token
    strings. Keys: "previous token", "self", "next token", "first token" (BERT's [CLS]), "[SEP]"
    (the last token when it is [SEP]) and "punctuation". Each is the weight the pattern receives,
    averaged over the queries, so it lies between 0 and 1.
    """
    stacked = torch.stack([a.reshape(a.shape[-3:]) for a in attentions]).float()
    length = stacked.shape[-1]
    if len(tokens) != length:
        raise ValueError(f"got {len(tokens)} tokens for attention maps over {length} positions.")
    first = torch.zeros(length, dtype=torch.bool)
    first[0] = True
    separators = torch.tensor([token == "[SEP]" for token in tokens])
    punctuation = torch.tensor([is_punctuation(token) for token in tokens])
    scores = {
        "previous token": previous_token_score(stacked),
        "self": self_score(stacked),
        "next token": next_token_score(stacked),
        "first token": attention_to(stacked, first),
    }
    if separators.any():
        scores["[SEP]"] = attention_to(stacked, separators)
    if punctuation.any():
        scores["punctuation"] = attention_to(stacked, punctuation)
    return scores


def classify_heads(scores: dict[str, torch.Tensor], threshold: float = 0.4) -> list[tuple[int, int, str, float]]:
    """The heads whose strongest pattern takes at least ``threshold`` of their attention.

    Returns ``(layer, head, pattern, score)`` tuples, strongest first. A head spread over many
    tokens (none of the patterns dominates) is not listed: it is doing something else.
    """
    names = list(scores)
    stacked = torch.stack([scores[name] for name in names])  # (patterns, L, H)
    best, which = stacked.max(dim=0)
    found = [(layer, head, names[int(which[layer, head])], float(best[layer, head]))
             for layer in range(best.shape[0]) for head in range(best.shape[1]) if best[layer, head] >= threshold]
    return sorted(found, key=lambda row: -row[3])


# ---------------------------------------------------------------- attention rollout


def attention_rollout(attentions: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """How much each input token reaches each position after the last layer (chapter 06, exercise 2).

    ``attentions``: L maps ``(..., H, T, T)`` (a list, or one tensor ``(L, ..., H, T, T)``), rows
    summing to 1. Following Abnar & Zuidema (2020): average each layer's heads, add the identity for
    the residual connection (half of what reaches the next layer is the token itself), renormalise
    the rows, and multiply the layers in order, the last on the left:

        Â_l = (mean_h A_l + I) / row sums,      R = Â_L · Â_{L-1} · ... · Â_1

    Returns ``(..., T, T)``: row i is how the output at position i is made of the input tokens;
    every row sums to 1.
    """
    stacked = attentions if isinstance(attentions, torch.Tensor) else torch.stack(list(attentions))
    averaged = stacked.mean(dim=-3)  # (L, ..., T, T): one map per layer
    identity = torch.eye(averaged.shape[-1], dtype=averaged.dtype, device=averaged.device)
    with_residual = averaged + identity
    with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
    rollout = with_residual[0]
    for layer in with_residual[1:]:
        rollout = layer @ rollout  # the later layer reads what the earlier ones made
    return rollout


# ---------------------------------------------------------------- gradient × input


def gradient_times_input(logits_fn: Callable[[torch.Tensor], torch.Tensor], embeddings: torch.Tensor,
                         target: int) -> torch.Tensor:
    """Saliency of every input token for one prediction (chapter 06, exercise 3).

    ``embeddings``: ``(T, d)``, the input embedding of each token; ``logits_fn`` maps such a tensor to
    the logits ``(T, V)``; the score is the logit of token ``target`` at the last position. Returns the
    ``(T,)`` signed sum over the embedding dimension of gradient times input,

        s_t = Σ_j  ∂ logit[T-1, target] / ∂ e_{t,j}  ·  e_{t,j}

    the first-order estimate of how much the score would change if token t's embedding were zeroed:
    positive where the token pushes the target up, negative where it pushes it down.
    """
    inputs = embeddings.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = logits_fn(inputs)[-1, target]
        (gradient,) = torch.autograd.grad(score, inputs)
    return (gradient * inputs).sum(dim=-1).detach()


def _input_embedding_layer(model: nn.Module) -> nn.Module:
    if hasattr(model, "token_embedding"):  # the course's GPT
        return model.token_embedding
    return model.get_input_embeddings()  # a transformers model


def as_function_of_embeddings(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """``(embeddings (T, d), logits_fn)`` for one sequence ``ids`` of shape ``(T,)`` or ``(1, T)``.

    ``logits_fn(e)`` runs the whole model on ``ids`` with its token embeddings replaced by ``e``
    (a forward hook swaps the embedding layer's output), and returns the logits ``(T, V)``. Positions,
    masks and everything else stay the model's own, so gradients with respect to ``e`` are exactly
    the gradients with respect to the token embeddings.
    """
    ids = ids.reshape(1, -1)
    layer = _input_embedding_layer(model)
    with torch.no_grad():
        embeddings = layer(ids)[0].detach()

    def logits_fn(replacement: torch.Tensor) -> torch.Tensor:
        handle = layer.register_forward_hook(lambda module, args, output: replacement[None].to(output.dtype))
        try:
            output = model(ids)
        finally:
            handle.remove()
        logits = output[0] if isinstance(output, tuple) else output.logits
        return logits[0]

    return embeddings, logits_fn


def saliency(model: nn.Module, ids: torch.Tensor, target: int) -> torch.Tensor:
    """Gradient × input of every token in ``ids`` for the logit of ``target`` at the last position: ``(T,)``."""
    embeddings, logits_fn = as_function_of_embeddings(model, ids)
    return gradient_times_input(logits_fn, embeddings, target)


# ---------------------------------------------------------------- linear probes


def _with_bias_column(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones_like(features[:, :1])], dim=1)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = 1.0) -> torch.Tensor:
    """Closed-form ridge regression onto one-hot labels (chapter 06, exercise 4).

    ``features``: ``(N, d)`` floats, ``labels``: ``(N,)`` int64 in ``[0, num_classes)``. With X the
    features plus a column of ones (the bias) and Y the one-hot labels, returns the ``(d + 1, C)``
    weights W = (XᵀX + ridge · I)⁻¹ XᵀY, the bias in the last row (regularised like the rest).
    A probe predicts the class with the largest score ``[features, 1] @ W``.
    """
    inputs = _with_bias_column(features)
    targets = torch.nn.functional.one_hot(labels, num_classes).to(inputs.dtype)
    gram = inputs.T @ inputs + ridge * torch.eye(inputs.shape[1], dtype=inputs.dtype, device=inputs.device)
    return torch.linalg.solve(gram, inputs.T @ targets)


def probe_predict(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The class a probe's ``weights`` (from :func:`fit_linear_probe`) predicts for each row of ``features``."""
    return (_with_bias_column(features.to(weights.dtype)) @ weights).argmax(dim=-1)


def probe_accuracy(weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``labels`` a probe predicts right."""
    return float((probe_predict(weights, features) == labels).float().mean())
