"""Resource limits that follow the machine: worker processes, image sides, batches, pixels.

Every check here is done before anything is allocated, and a value past its limit is refused
with one line saying the limit: worker processes at most ``WORKERS_PER_CORE`` per CPU core
(never fewer than ``MIN_WORKER_LIMIT``, so that a shipped config runs on a small machine),
image sides at most ``MAX_IMAGE_SIDE``, a batch at most what this machine's memory holds as
float32, an image to decode at most ``MAX_IMAGE_PIXELS`` pixels.
"""

from __future__ import annotations

import os

WORKERS_PER_CORE = 4
MIN_WORKER_LIMIT = 16
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
_GIB = 1 << 30


class ImageTooLargeError(ValueError):
    """An image whose pixel count is past ``MAX_IMAGE_PIXELS``; refused before it is decoded."""


def max_workers() -> int:
    """The most data loading worker processes: ``WORKERS_PER_CORE`` per CPU core, at least
    ``MIN_WORKER_LIMIT``."""
    return max(WORKERS_PER_CORE * (os.cpu_count() or 1), MIN_WORKER_LIMIT)


def workers_problem(count: int) -> str | None:
    """Why ``count`` worker processes cannot be started, or None when they can."""
    if count < 0:
        return "must be >= 0"
    limit = max_workers()
    if count > limit:
        return (
            f"must be <= {limit} ({WORKERS_PER_CORE} per CPU core of this machine, "
            f"at least {MIN_WORKER_LIMIT})"
        )
    return None


def image_side_problem(side: int) -> str | None:
    """Why ``side`` is not a usable input resolution, or None when it is."""
    if side < 1:
        return "must be >= 1"
    if side > MAX_IMAGE_SIDE:
        return f"must be <= {MAX_IMAGE_SIDE} pixels"
    return None


def memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def batch_problem(batch: int, side: int, channels: int) -> str | None:
    """Why a batch of ``batch`` (side, side, channels) images does not fit this machine's memory
    as float32 (how it is normalised), or None when it does."""
    needed = batch * side * side * channels * 4
    available = memory_bytes()
    if needed <= available:
        return None
    return (
        f"{batch} images of {side}x{side}x{channels} need {needed / _GIB:,.1f} GiB as float32, "
        f"more than this machine's {available / _GIB:,.1f} GiB of memory"
    )


def check_image_pixels(height: int, width: int, what: str) -> None:
    """Raise ``ImageTooLargeError`` naming ``what`` when a (height, width) image has more than
    ``MAX_IMAGE_PIXELS`` pixels."""
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{what}: {width}x{height} pixels is more than the {MAX_IMAGE_PIXELS:,} pixels an "
            "image may have (a decompression bomb?)"
        )
