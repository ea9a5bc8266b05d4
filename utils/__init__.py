"""The course's Python package: reference code that the chapters teach and later chapters import.

One module per concept; each function's docstring names the chapter that teaches it.

    device      pick CUDA, MPS or CPU once; autocast; seeds           (every chapter)
    data        the course corpus with an offline fallback             (chapter 01 on)
    tokenizers  character tokenizer and byte-pair encoding             (chapter 01)
    embeddings  embedding lookup as a one-hot matrix product           (chapter 01)
    attention   softmax, scaled dot-product attention, masks, heads    (chapters 02-03)
    positions   sinusoidal, learned and rotary position encodings      (chapter 03)
    model       config dataclass, norms, MLPs, block, GPT; counts      (chapter 04)
    pretrained  MiniLM BERT and GPT-2 weights in the course's code     (chapter 04)
    train       batches, schedule, AdamW, loop, checkpoints            (chapter 05)
    generate    temperature, top-k and top-p sampling                  (chapter 05)
    kv_cache    KV cache, prefill/decode, GQA/MQA, cache memory        (chapter 07)
    efficient_attention  sparse masks, linear and tiled attention, peak memory  (chapter 08)
    triton_attention     a FlashAttention kernel in Triton (optional, GPU)     (chapter 08)
    quant       int8/int4/NF4/ternary quantization, QuantizedLinear, QAT (chapter 09)
    lora        LoRA, DoRA, QLoRA and BitFit; merging; fine-tuning compared  (chapter 10)
    timing      best-of-N timing for notebooks and benchmarks
    viz         plots, results tables, attention widgets, offline bertviz views (chapters 02, 06)
    interpret   head scores, attention rollout, saliency, linear probes (chapter 06)
    checks      graders for the exercises, one module per chapter

``QUICK`` is the one switch a notebook may read to shorten long training loops
(set ``COURSE_QUICK=1``; the test suite does). It never skips a check, and the
benchmarks in ``benchmarks/`` always run the full settings.
"""

import os

__version__ = "0.1.0"

QUICK: bool = os.environ.get("COURSE_QUICK", "") not in ("", "0", "false", "False")
