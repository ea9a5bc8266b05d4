"""Where the tensors live: pick CUDA, then Apple MPS, then CPU, once. Taught in every chapter.

Notebooks call ``device = pick()`` in their set-up cell and size GPU-optional demos with
``is_accelerated(device)``; nothing in the course requires an accelerator.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick(verbose: bool = True) -> torch.device:
    """Return the best available device: CUDA, then MPS, then CPU, and say which.

    ``COURSE_DEVICE=cpu`` (or ``cuda``, ``mps``) overrides the choice, e.g. to compare speeds.
    """
    forced = os.environ.get("COURSE_DEVICE", "").strip().lower()
    if forced:
        device = torch.device(forced)
        reason = "forced by COURSE_DEVICE"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        reason = torch.cuda.get_device_name(0)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
        reason = "Apple Metal"
    else:
        device = torch.device("cpu")
        reason = f"{torch.get_num_threads()} threads; no CUDA or MPS found, which is fine for this course"
    if verbose:
        print(f"Using device: {device.type} ({reason})")
    return device


def is_accelerated(device: torch.device | str) -> bool:
    """True on CUDA or MPS: GPU-optional cells use it to choose a bigger size."""
    return torch.device(device).type in ("cuda", "mps")


def autocast(device: torch.device | str, enabled: bool = True):
    """Mixed precision where it pays: bfloat16 autocast on CUDA, a no-op elsewhere.

    On CPU and MPS the course keeps float32 so that results match the reference exactly.
    """
    device = torch.device(device)
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def set_seed(seed: int = 1337) -> None:
    """Seed Python, NumPy and torch (all devices) so that a notebook re-runs to the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS generators
