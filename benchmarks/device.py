"""The machine a result was measured on: its device, memory and package versions."""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm", "triton")


def platform_name() -> str:
    return jax.devices()[0].platform


def device_name() -> str:
    d = jax.devices()[0]
    return d.device_kind if d.platform != "cpu" else f"cpu ({platform.processor() or 'x86_64'})"


def gpu_memory_gb() -> float:
    """GB of device memory that processes may share: 85% of a CUDA device's total, else JAX's
    allocator limit (16 where the platform does not say)."""
    torch = torch_cuda()
    if torch is not None:
        return 0.85 * torch.cuda.mem_get_info()[1] / 2**30
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 16 * 2**30) / 2**30


def device_slug(quick: bool = False) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    return f"{slug}-quick" if quick else slug


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        out["torch_cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return out


def torch_cuda() -> Any | None:
    """The torch module when torch and a CUDA device are available, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None
