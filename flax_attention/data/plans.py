"""The host's half of GPU decoding: per record a crop plan (no pixel decoded), or its pixels when
the GPU decoder does not take the image; per batch, arrays of both.

A training or evaluation row is one of:

- a plan row, for a JPEG the GPU decodes (``GPU_COLORSPACES``): {"jpeg": uint8 (n,), "box":
  int32 (4,) (top, left, height, width), "flip": bool, "label": int32}; the crop and flip are
  the CPU decoder's for the same record (``CropPlan``: ``imagenet_train``'s random choices;
  ``CenterCropPlan``: the centre crop of ``imagenet_eval``);
- a pixel row, {"image": uint8 (S, S, C), "label": int32}: the CPU decoder's output for the
  record, for an image the GPU decoder does not take (not a JPEG, e.g. a PNG named .JPEG; a
  CMYK or YCCK JPEG; a JPEG over ``GPU_MAX_PIXELS``) and for the hybrid decoder's CPU rows.

``collate_plans`` makes a batch of B rows: {"jpeg": uint8 (sum n,), "offsets": int64 (B + 1,),
"box": int32 (B, 4), "flip": bool (B,), "label": int32 (B,), "pixels": uint8 (k, S, S, C),
"pixel_rows": int32 (k,)}; a pixel row has no bytes, the box (0, 0, S, S) and no flip, so the
GPU decoder's resize leaves its pixels as they are. Only arrays: cheap to pass between
processes. ``slice_plans`` cuts a batch into each device's rows, ``pad_plans`` pads an
evaluation batch with zero pixel rows.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from flax_attention.data.decode import is_jpeg
from flax_attention.data.limits import check_image_pixels
from flax_attention.data.preprocess import (
    Box,
    EvalPreprocess,
    TrainPreprocess,
    center_crop_box,
    imagenet_train_plan,
)

# JPEG colour spaces (as libjpeg-turbo's header reader names them) that nvImageCodec decodes to
# sRGB like libjpeg-turbo does; others (CMYK, YCCK) are decoded on the host.
GPU_COLORSPACES = frozenset({"YCbCr", "Gray"})
# Larger JPEGs are decoded on the host: nvImageCodec's decode of a batch holding one can hold
# up the training step's own CUDA calls (docs/input.md).
GPU_MAX_PIXELS = 4 << 20
PLAN_KEYS = ("jpeg", "offsets", "box", "flip", "pixels", "pixel_rows")
_NO_PIXELS = np.zeros((0, 0, 0, 3), np.uint8)


def gpu_jpeg_size(payload: bytes) -> tuple[int, int] | None:
    """(height, width) of ``payload`` when it is a JPEG the GPU decoder takes (colour space in
    ``GPU_COLORSPACES``, at most ``GPU_MAX_PIXELS``), else None."""
    if not is_jpeg(payload):
        return None
    import simplejpeg

    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(payload)
    takes = colorspace in GPU_COLORSPACES and height * width <= GPU_MAX_PIXELS
    return (height, width) if takes else None


def _plan_row(payload: bytes, box: Box, flip: bool, label: int) -> dict:
    return {
        "jpeg": np.frombuffer(payload, np.uint8),
        "box": np.asarray(box, np.int32),
        "flip": np.bool_(flip),
        "label": np.int32(label),
    }


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """grain ``random_map`` callable: a training record {"image": encoded bytes, "label"} -> its
    plan row (crop and flip drawn as ``imagenet_train`` draws them from ``rng``), or the pixel
    row ``preprocess`` makes of it when the GPU decoder does not take the image. A JPEG past the
    pixel budget is refused (``limits.ImageTooLargeError``) before the GPU sees it."""

    preprocess: TrainPreprocess

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        payload = bytes(record["image"])
        size = gpu_jpeg_size(payload)
        if size is None:
            return self.preprocess(record, rng)
        check_image_pixels(*size, "dataset image")
        box, flip = imagenet_train_plan(*size, rng)
        return _plan_row(payload, box, flip, record["label"])


@dataclasses.dataclass(frozen=True)
class CenterCropPlan:
    """grain ``map`` callable: an evaluation record -> its plan row (the source box of
    ``imagenet_eval``'s centre crop, ``preprocess.center_crop_box``, no flip), or the pixel row
    ``preprocess`` makes of it when the GPU decoder does not take the image."""

    preprocess: EvalPreprocess

    def __call__(self, record: dict) -> dict:
        payload = bytes(record["image"])
        size = gpu_jpeg_size(payload)
        if size is None:
            return self.preprocess(record)
        check_image_pixels(*size, "dataset image")
        box = center_crop_box(*size, self.preprocess.size)
        return _plan_row(payload, box, False, record["label"])


def collate_plans(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """grain ``batch_fn``: B plan or pixel rows, in any order -> a plan batch (module
    docstring)."""
    pixel_rows = [i for i, row in enumerate(rows) if "image" in row]
    pixels = np.stack([rows[i]["image"] for i in pixel_rows]) if pixel_rows else _NO_PIXELS
    side = pixels.shape[1]
    empty = np.zeros(0, np.uint8)
    jpegs = [row.get("jpeg", empty) for row in rows]
    boxes = [row["box"] if "box" in row else np.array([0, 0, side, side], np.int32) for row in rows]
    return {
        "jpeg": np.concatenate(jpegs),
        "offsets": np.concatenate([[0], np.cumsum([len(j) for j in jpegs])]).astype(np.int64),
        "box": np.stack(boxes).astype(np.int32),
        "flip": np.array([bool(row.get("flip", False)) for row in rows]),
        "label": np.array([row["label"] for row in rows], np.int32),
        "pixels": pixels,
        "pixel_rows": np.asarray(pixel_rows, np.int32),
    }


def slice_plans(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """The plan batch of rows [start, stop) of ``batch`` (``PLAN_KEYS`` and "label")."""
    offsets = batch["offsets"][start : stop + 1]
    inside = (batch["pixel_rows"] >= start) & (batch["pixel_rows"] < stop)
    return {
        "jpeg": batch["jpeg"][offsets[0] : offsets[-1]],
        "offsets": offsets - offsets[0],
        "box": batch["box"][start:stop],
        "flip": batch["flip"][start:stop],
        "label": batch["label"][start:stop],
        "pixels": batch["pixels"][inside],
        "pixel_rows": batch["pixel_rows"][inside] - start,
    }


def pad_plans(batch: dict | None, rows: int, like: dict) -> dict[str, np.ndarray]:
    """An evaluation plan batch (or nothing) padded to ``rows`` rows with zero pixel rows of
    ``like["image"]``'s row shape (S, S, C), label 0, plus a float32 "mask" (rows,): 1 for the
    batch's rows, 0 for the padding."""
    n = 0 if batch is None else len(batch["label"])
    padding = [
        {"image": np.zeros(like["image"].shape[1:], np.uint8), "label": 0} for _ in range(rows - n)
    ]
    pad = collate_plans(padding) if padding else None
    if batch is None:
        out = pad
    elif pad is None:
        out = dict(batch)
    else:
        pixels = [p for p in (batch["pixels"], pad["pixels"]) if len(p)]
        out = {
            "jpeg": batch["jpeg"],
            "offsets": np.concatenate(
                [batch["offsets"], batch["offsets"][-1] + pad["offsets"][1:]]
            ),
            "box": np.concatenate([batch["box"], pad["box"]]),
            "flip": np.concatenate([batch["flip"], pad["flip"]]),
            "label": np.concatenate([batch["label"], pad["label"]]),
            "pixels": np.concatenate(pixels),
            "pixel_rows": np.concatenate([batch["pixel_rows"], pad["pixel_rows"] + n]),
        }
    out["mask"] = (np.arange(rows) < n).astype(np.float32)
    return out
