"""The transformer block and the GPT model (chapter 04), in the spirit of nanoGPT's ``model.py``.

One config dataclass describes every model in the course: the chapter-05 character GPT
(pre-norm, RMSNorm, SwiGLU, rotary positions) and, with other switches, GPT-2 and BERT
(post-norm, LayerNorm with biases, GELU, learned positions, no causal mask): an encoder is the
same block without the causal mask, which is how chapter 04 loads a pretrained MiniLM into this
code and matches its hidden states.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention
from .positions import LearnedPositions, sinusoidal_positions


@dataclass
class GPTConfig:
    """Everything that decides a model's shape and architecture."""

    vocab_size: int = 77
    context_length: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp: str = "swiglu"  # "swiglu" or "gelu" (the 4x MLP of GPT-2 and BERT)
    d_hidden: int | None = None  # MLP width; None: 4·d_model for gelu, the same parameter count for swiglu
    activation: str = "gelu"  # for mlp="gelu": "gelu" (exact, BERT) or "gelu_tanh" (GPT-2)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-5
    position: str = "rope"  # "rope", "learned", "sinusoidal" or "none"
    rope_base: float = 10_000.0
    prenorm: bool = True  # False: post-norm as in BERT and the original transformer
    causal: bool = True  # False: a bidirectional encoder such as BERT
    bias: bool = False
    type_vocab_size: int = 0  # BERT's segment embeddings; 0 for none
    tie_weights: bool = True  # the output head shares the token embedding matrix
    dropout: float = 0.0
    fused_attention: bool = True  # PyTorch's attention kernel when weights are not asked for

    @property
    def mlp_hidden(self) -> int:
        if self.d_hidden:
            return self.d_hidden
        if self.mlp == "swiglu":  # three matrices instead of two: 2/3 of 4·d keeps the parameter count
            return 64 * math.ceil(8 * self.d_model / 3 / 64) if self.d_model >= 64 else 8 * self.d_model // 3
        return 4 * self.d_model


# ---------------------------------------------------------------- normalisation


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (chapter 04, exercise 1).

    The variance is the biased one (divide by d, not d - 1), as in the paper and PyTorch, and
    ``eps`` sits inside the square root so that a constant row gives ``bias``, not a division by zero.
    """
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(variance + eps) * weight
    return y + bias if bias is not None else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) * weight`` over the last axis: no mean, no shift (chapter 04, exercise 2)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class LayerNorm(nn.Module):
    """Subtract the mean, divide by the standard deviation, then scale and shift (chapter 04)."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Divide by the root mean square only: no mean, no shift; cheaper and just as good (chapter 04)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    if config.norm == "layernorm":
        return LayerNorm(config.d_model, config.norm_eps, bias=config.bias)
    raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {config.norm!r}.")


# ---------------------------------------------------------------- feed-forward


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, ``x · Φ(x)`` with Φ the standard normal CDF (chapter 04)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU (chapter 04)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class MLP(nn.Module):
    """``W₂ · gelu(W₁ x)``: widen to ``d_hidden``, bend, project back (chapter 04)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, activation: str = "gelu"):
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_model, bias=bias)
        self.activation = {"gelu": gelu, "gelu_tanh": gelu_tanh}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``(silu(x W_gate) ⊙ x W_up) W_down`` without biases (chapter 04, exercise 3).

    Weights in the equation's layout: ``w_gate`` and ``w_up`` are ``(d_model, d_hidden)``, ``w_down``
    is ``(d_hidden, d_model)``; :class:`SwiGLU` holds the same matrices transposed, as ``nn.Linear`` does.
    """
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SwiGLU(nn.Module):
    """``W_down · (silu(W_gate x) ⊙ W_up x)``: a gated MLP, as in Llama and PaLM (chapter 04)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=bias)
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_mlp(config: GPTConfig) -> nn.Module:
    if config.mlp == "swiglu":
        return SwiGLU(config.d_model, config.mlp_hidden, config.bias)
    if config.mlp == "gelu":
        return MLP(config.d_model, config.mlp_hidden, config.bias, config.activation)
    raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {config.mlp!r}.")


# ---------------------------------------------------------------- the block


class Block(nn.Module):
    """Attention then MLP, each wrapped in a residual connection and a norm (chapter 04).

    Pre-norm (GPT-2 onwards): ``x + f(norm(x))``: the residual stream is never normalised, so
    gradients reach early layers unchanged. Post-norm (original transformer, BERT):
    ``norm(x + f(x))``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.prenorm = config.prenorm
        self.attn = MultiHeadAttention(
            config.d_model, config.n_head, causal=config.causal, bias=config.bias,
            rope=config.position == "rope", rope_base=config.rope_base, max_length=config.context_length,
            dropout=config.dropout, fused=config.fused_attention)
        self.norm1 = make_norm(config)
        self.mlp = make_mlp(config)
        self.norm2 = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        if self.prenorm:
            attended = self.attn(self.norm1(x), mask, return_weights=return_weights)
        else:
            attended = self.attn(x, mask, return_weights=return_weights)
        attended, weights = attended if return_weights else (attended, None)
        if self.prenorm:
            x = x + self.dropout(attended)
            x = x + self.dropout(self.mlp(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout(attended))
            x = self.norm2(x + self.dropout(self.mlp(x)))
        return (x, weights) if return_weights else x


# ---------------------------------------------------------------- the model


class GPT(nn.Module):
    """Token embedding → positions → N blocks → norm → output head tied to the embedding (chapter 04)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = LearnedPositions(config.context_length, config.d_model) if config.position == "learned" else None
        if config.position == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_positions(config.context_length, config.d_model), persistent=False)
        self.token_type_embedding = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.embedding_norm = None if config.prenorm else make_norm(config)  # post-norm models normalise the input
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config) if config.prenorm else None  # pre-norm leaves the stream un-normalised
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink the last projection
        # by sqrt(2·layers) to keep the stream's variance from growing with depth.
        for name, parameter in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"got {length} tokens, but the model's context_length is {self.config.context_length}.")
        x = self.token_embedding(ids)
        if self.positions is not None:
            x = x + self.positions(length)
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoids[:length]
        if self.token_type_embedding is not None:
            types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embedding(types)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.dropout(x)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None):
        """ids ``(B, T)`` → logits ``(B, T, vocab)``, and the mean cross-entropy when ``targets`` are given.

        ``attention_mask`` is ``(B, T)`` with 1 for real tokens and 0 for padding (the Hugging Face convention).
        """
        x = self.embed(ids, token_type_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def inspect(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> dict:
        """Every hidden state and every attention map: ``{"hidden_states": [L+1 × (B, T, d)], "attentions": [L × (B, H, T, T)]}``.

        ``hidden_states[0]`` is the embedding output and ``hidden_states[i]`` the output of block i,
        the layout of Hugging Face's ``output_hidden_states``. Used in chapters 04 and 06.
        """
        x = self.embed(ids, token_type_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        hidden_states, attentions = [x], []
        for block in self.blocks:
            x, weights = block(x, mask, return_weights=True)
            hidden_states.append(x)
            attentions.append(weights)
        return {"hidden_states": hidden_states, "attentions": attentions}


# ---------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component (embedding, attention, mlp, norms, head), shared weights counted once (chapter 04)."""
    counts = {"embedding": 0, "positions": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if ".attn." in name:
            key = "attention"
        elif ".mlp." in name:
            key = "mlp"
        elif "norm" in name:
            key = "norms"
        elif "positions" in name:
            key = "positions"
        elif name.startswith("lm_head"):
            key = "head"
        else:
            key = "embedding"
        counts[key] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(config: GPTConfig, context: int | None = None) -> dict[str, int]:
    """Forward-pass FLOPs per token by component, counting a multiply-add as 2 FLOPs (chapter 04).

    A matrix product with an ``(m, n)`` weight costs ``2·m·n`` per token. Attention adds the
    score and mix products, ``2·2·T·d`` per layer for a context of T (the average causal row
    is half that; the usual estimate counts it in full). Training costs about 3x the forward
    pass (the backward pass is twice the forward), hence the rule of thumb 6·N per token.
    """
    d, layers, T = config.d_model, config.n_layer, context or config.context_length
    mlp_matrices = 3 if config.mlp == "swiglu" else 2
    flops = {
        "attention projections": layers * 2 * 4 * d * d,
        "attention scores and mix": layers * 2 * 2 * T * d,
        "mlp": layers * 2 * mlp_matrices * d * config.mlp_hidden,
        "head": 2 * d * config.vocab_size,
    }
    flops["total"] = sum(flops.values())
    return flops


def config_dict(config: GPTConfig) -> dict:
    return asdict(config)
