"""Tuned block sizes as data: ``configs/<kernel>.json``, keyed by device name, shape and M bucket.

File layout (written by ``python -m expertpool.kernels.tune``)::

    {"default": {"<M bucket>": {"BLOCK_M": .., "BLOCK_N": .., "num_warps": .., "num_stages": ..}},
     "devices": {"NVIDIA H200": {"N=7168,K=16384": {"<M bucket>": {...}}}}}

Lookup: the device's entry for the shape, else ``default`` (this fallback is logged once per
device and shape). Within an entry the smallest M bucket >= M wins, else the largest; M is the
row count for ``fp8_gemm`` and the token count for the grouped MoE GEMM.

Trade-off: a shape's config is chosen per call from a cached dict (no autotune at run time, so
the first call of a new shape costs one compile, not a sweep).
"""

import functools
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
KERNELS = ("fp8_gemm", "fused_moe")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def gemm_shape_key(n: int, k: int) -> str:
    return f"N={n},K={k}"


def moe_shape_key(e: int, f: int, d: int) -> str:
    return f"E={e},F={f},D={d}"


@functools.cache
def load_table(kernel: str) -> dict:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return json.loads((CONFIG_DIR / f"{kernel}.json").read_text())


@functools.cache
def _log_fallback(kernel: str, device: str, shape_key: str) -> None:
    logger.info("expertpool.kernels: no tuned %s config for %s on %r; using the default "
                "(run `python -m expertpool.kernels.tune` on that GPU)", kernel, shape_key, device)


def pick_bucket(entry: dict, m: int) -> dict:
    buckets = sorted(int(b) for b in entry)
    chosen = next((b for b in buckets if b >= m), buckets[-1])
    return dict(entry[str(chosen)])


def get_config(kernel: str, shape_key: str, m: int, device: torch.device) -> dict:
    table = load_table(kernel)
    name = device_name(device)
    entry = table.get("devices", {}).get(name, {}).get(shape_key)
    if entry is None:
        _log_fallback(kernel, name, shape_key)
        entry = table["default"]
    return pick_bucket(entry, m)
