"""The embedded tiny DeepSeek-V3-shaped model: created on first use in a cache directory, no download.

``ensure_embedded_model()`` returns a complete HF-format checkpoint directory (config.json,
safetensors, tokenizer.json, tokenizer_config.json with the DeepSeek-V3 chat template). Creation is
deterministic (fixed seed) and guarded by a file lock, so concurrent workers share one copy.
``init_model`` is the general form behind ``expertpool init-model``.
"""

import fcntl
import logging
import os
from pathlib import Path

import torch

from expertpool.errors import UserError
from expertpool.model.args import EMBEDDED_MODEL_NAME, PRESETS, ModelArgs, preset
from expertpool.model.checkpoint import checkpoint_tensors
from expertpool.model.safetensors_io import write_safetensors_dir
from expertpool.model.storage import cache_dir
from expertpool.model.tokenizer import build_tiny_tokenizer, tokenizer_files
from expertpool.model.transformer import init_random

log = logging.getLogger(__name__)

EMBEDDED_VERSION = "v2"  # v2: chat template with tools and tool calls
# std of the random init: large enough that greedy logits have clear margins on the tiny model
TINY_INIT_STD = 0.1


class InitModelError(UserError, ValueError):
    """A random checkpoint that cannot be written here; the message names the size and a preset that fits."""


def init_model_bytes(args: ModelArgs, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak memory of :func:`init_model`: the float32 model it initialises plus the copy it writes
    (projections in fp8, one byte each, or all of it in ``dtype``)."""
    stored = 1 if fp8 else torch.empty((), dtype=dtype).element_size()
    return args.num_params() * (4 + stored)


def available_memory_bytes() -> int:
    """Memory this process can still allocate without swapping (psutil's ``available`` when installed,
    else the free physical pages)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def init_model(preset_name: str, out_dir, *, fp8: bool = False, seed: int = 0, std: float | None = None,
               dtype: torch.dtype = torch.bfloat16, available_bytes: int | None = None,
               mtp_layers: int | None = None) -> Path:
    """Write a random-weight checkpoint of a preset with a tokenizer; loadable by transformers too.

    ``mtp_layers``: that many MTP modules instead of the preset's (bench-mini has none). Refuses
    (``InitModelError``) a preset whose peak memory (:func:`init_model_bytes`) exceeds
    ``available_bytes`` (default: :func:`available_memory_bytes`), before allocating anything."""
    args = preset(preset_name)
    if mtp_layers is not None:
        args = args.replace(num_nextn_predict_layers=mtp_layers)
    need = init_model_bytes(args, fp8=fp8, dtype=dtype)
    have = available_memory_bytes() if available_bytes is None else available_bytes
    if need > have:
        fits = [name for name, a in PRESETS.items() if init_model_bytes(a, fp8=fp8, dtype=dtype) <= have]
        raise InitModelError(
            f"preset {preset_name!r} has {args.num_params() / 1e9:.1f}B parameters and needs ~{_size(need)} of memory "
            f"to initialise (a float32 model plus the copy it writes), but {_size(have)} is available; "
            + (f"choose a smaller preset ({', '.join(fits)})" if fits else "free memory or use a larger machine"))
    if std is None:
        std = TINY_INIT_STD if preset_name == "tiny" else 0.02
    model = init_random(args, seed=seed, std=std)
    if preset_name == "tiny":
        g = torch.Generator().manual_seed(seed + 1)
        for moe in model.moe_layers():  # a nonzero router bias so selection differs from gating
            moe.gate.e_score_correction_bias.copy_(torch.randn(args.n_routed_experts, generator=g) * 0.05)
    tok = build_tiny_tokenizer(min(args.vocab_size, 512 if preset_name == "tiny" else 2048))
    if tok.get_vocab_size() < args.vocab_size:
        # every model id must decode to visible text (streamed chunks, token counts): name the rest
        tok.add_tokens([f"<x{i}>" for i in range(tok.get_vocab_size(), args.vocab_size)])
    config = args.replace(fp8=fp8).to_hf_config()
    return write_safetensors_dir(checkpoint_tensors(model, fp8=fp8, dtype=dtype), config, out_dir,
                                 extra_files=tokenizer_files(tok, args.max_position_embeddings))


def ensure_embedded_model(root: Path | None = None) -> Path:
    root = Path(root) if root else cache_dir()
    out = root / f"{EMBEDDED_MODEL_NAME}-{EMBEDDED_VERSION}"
    if (out / "tokenizer_config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{EMBEDDED_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tokenizer_config.json").exists():
            log.info("creating the embedded tiny model in %s", out)
            init_model("tiny", out, seed=0)
    return out
