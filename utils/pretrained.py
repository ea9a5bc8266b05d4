"""Real pretrained weights in the course's own code (chapter 04).

``course_model_from_bert`` copies a Hugging Face BERT (the MiniLM-L6 that ``utils.data.minilm_path``
provides, online or not) into :class:`utils.model.GPT` configured as a post-norm bidirectional
encoder; ``course_model_from_gpt2`` does the same for GPT-2 (online only). Matching the reference
implementation's hidden states to 1e-4 is the proof that the from-scratch blocks are the real thing.
"""

from __future__ import annotations

import torch

from .data import minilm_cached, minilm_path  # noqa: F401 - minilm_cached is used by the notebooks
from .model import GPT, GPTConfig


def load_minilm(attn_implementation: str = "eager"):
    """The pretrained MiniLM-L6 BERT and its tokenizer from ``transformers``, offline if need be.

    ``eager`` attention returns attention weights (transformers 5 defaults to SDPA, which does not).
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    path = minilm_path()
    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a local 90 MB file loads in a second: no widget in the notebook's output
    try:
        model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    return model, AutoTokenizer.from_pretrained(path)


def bert_config(hf_config) -> GPTConfig:
    """The course config that describes a Hugging Face ``BertConfig``."""
    return GPTConfig(
        vocab_size=hf_config.vocab_size, context_length=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads, d_model=hf_config.hidden_size,
        mlp="gelu", d_hidden=hf_config.intermediate_size, activation="gelu", norm="layernorm",
        norm_eps=hf_config.layer_norm_eps, position="learned", prenorm=False, causal=False, bias=True,
        type_vocab_size=hf_config.type_vocab_size, tie_weights=True, dropout=0.0)


def _copy(target: torch.nn.Parameter, source: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ValueError(f"{name}: course shape {tuple(target.shape)} but pretrained shape {tuple(source.shape)}.")
    with torch.no_grad():
        target.copy_(source)


def course_model_from_bert(hf_model) -> GPT:
    """Copy every weight of a Hugging Face ``BertModel`` into the course's GPT class (as an encoder)."""
    config = bert_config(hf_model.config)
    model = GPT(config).eval()
    sd = hf_model.state_dict()
    _copy(model.token_embedding.weight, sd["embeddings.word_embeddings.weight"], "token embedding")
    _copy(model.positions.weight, sd["embeddings.position_embeddings.weight"], "positions")
    _copy(model.token_type_embedding.weight, sd["embeddings.token_type_embeddings.weight"], "token types")
    _copy(model.embedding_norm.weight, sd["embeddings.LayerNorm.weight"], "embedding norm")
    _copy(model.embedding_norm.bias, sd["embeddings.LayerNorm.bias"], "embedding norm")
    pairs = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
             "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
             "norm1": "attention.output.LayerNorm", "mlp.up": "intermediate.dense",
             "mlp.down": "output.dense", "norm2": "output.LayerNorm"}
    ours = dict(model.named_parameters())
    for i in range(config.n_layer):
        for course, hf in pairs.items():
            for kind in ("weight", "bias"):
                _copy(ours[f"blocks.{i}.{course}.{kind}"], sd[f"encoder.layer.{i}.{hf}.{kind}"], f"layer {i} {course}")
    return model


def gpt2_config(hf_config) -> GPTConfig:
    """The course config that describes a Hugging Face ``GPT2Config``."""
    return GPTConfig(
        vocab_size=hf_config.vocab_size, context_length=hf_config.n_positions, n_layer=hf_config.n_layer,
        n_head=hf_config.n_head, d_model=hf_config.n_embd, mlp="gelu", d_hidden=4 * hf_config.n_embd,
        activation="gelu_tanh", norm="layernorm", norm_eps=hf_config.layer_norm_epsilon, position="learned",
        prenorm=True, causal=True, bias=True, tie_weights=True, dropout=0.0)


def course_model_from_gpt2(hf_model) -> GPT:
    """Copy a Hugging Face ``GPT2LMHeadModel`` into the course's GPT class.

    GPT-2 stores its projections as ``Conv1D`` with the weight transposed (in, out), and the
    query, key and value matrices side by side in one ``c_attn``: split and transpose them.
    """
    config = gpt2_config(hf_model.config)
    model = GPT(config).eval()
    sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    _copy(model.token_embedding.weight, sd["wte.weight"], "token embedding")
    _copy(model.positions.weight, sd["wpe.weight"][: config.context_length], "positions")
    _copy(model.final_norm.weight, sd["ln_f.weight"], "final norm")
    _copy(model.final_norm.bias, sd["ln_f.bias"], "final norm")
    d = config.d_model
    for i, block in enumerate(model.blocks):
        prefix = f"h.{i}."
        weight, bias = sd[prefix + "attn.c_attn.weight"], sd[prefix + "attn.c_attn.bias"]
        for j, linear in enumerate((block.attn.query, block.attn.key, block.attn.value)):
            _copy(linear.weight, weight[:, j * d:(j + 1) * d].t(), f"layer {i} qkv")
            _copy(linear.bias, bias[j * d:(j + 1) * d], f"layer {i} qkv")
        for linear, hf in ((block.attn.out, "attn.c_proj"), (block.mlp.up, "mlp.c_fc"), (block.mlp.down, "mlp.c_proj")):
            _copy(linear.weight, sd[prefix + hf + ".weight"].t(), f"layer {i} {hf}")
            _copy(linear.bias, sd[prefix + hf + ".bias"], f"layer {i} {hf}")
        for norm, hf in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
            _copy(norm.weight, sd[prefix + hf + ".weight"], f"layer {i} {hf}")
            _copy(norm.bias, sd[prefix + hf + ".bias"], f"layer {i} {hf}")
    return model


def load_gpt2(name: str = "gpt2"):
    """GPT-2 from the Hugging Face hub, or None (with a one-line reason) when it cannot be reached.

    There is no offline copy of GPT-2 in any package, so chapter 04 skips this part cleanly offline.
    """
    import os
    import socket

    if os.environ.get("COURSE_OFFLINE", "") not in ("", "0"):
        print("GPT-2 skipped: COURSE_OFFLINE is set.")
        return None
    try:
        socket.getaddrinfo("huggingface.co", 443)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - offline is an expected state, reported in one line
        print(f"GPT-2 skipped: the Hugging Face hub is not reachable ({type(error).__name__}).")
        return None
