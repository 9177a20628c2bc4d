"""JPEG decoding on the GPU: the host reads records and draws the crops, the GPU decodes them.

The training split of a JPEG dataset (ImageNet) goes through three stages:

1. Host, per record (grain ``random_map``, ``CropPlan``): read the JPEG header for the image's
   size and draw the augmentation, ``imagenet_train_plan`` with the same generator the CPU path
   uses, so both decoders choose the same crop and flip for a record. No pixel is decoded.
2. Host, per batch (``collate_plans``): the batch's JPEG bytes concatenated into one uint8 array
   with offsets, plus boxes, flips and labels. Only arrays: cheap to pass between processes.
3. GPU (``GpuJpegDecoder``): nvImageCodec decodes the batch with each crop box as the region of
   interest (only the crop's pixels are produced; nvJPEG's hardware decoder where the GPU has
   one), one CUDA kernel (through CuPy) copies the crops into a zero-padded (B, H, W, 3) canvas,
   which JAX takes over through DLPack without a copy; ``resize_crops``
   (one jitted program per canvas size) resamples every crop to (size, size) with an
   antialiased bilinear filter (Pillow's and torchvision's ``antialias=True``) as two batched
   matrix products, mirrors, and rounds back to uint8. Normalisation stays in the training step.

Decoding shares the GPU with the training step: nvJPEG's hardware decoder follows each image
with a small conversion kernel on a stream of its own. With CUDA's default of 8 hardware work
queues per context, those streams share queues with XLA's and each kernel waits behind the
training step's queued kernels: on one H200 a batch then took 157 ms to decode instead of 34 ms.
``share_gpu_with_training`` raises the queue count before the GPU is first used.

GPU decoding needs ``nvidia-nvimgcodec-cu13`` (with ``nvidia-nvjpeg``) and ``cupy-cuda13x``:
``pip install 'flax-attention[gpu-decode]'``. It serves the training split of JPEG datasets on a
single process; evaluation decodes on the CPU.
"""

import dataclasses
import functools
import importlib.util
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.data.decode import image_size
from flax_attention.data.limits import check_image_pixels
from flax_attention.data.preprocess import imagenet_train_plan


def gpu_decoding_available() -> bool:
    """Whether JAX runs on a CUDA GPU and nvImageCodec and CuPy can be imported."""
    modules = ("nvidia.nvimgcodec", "cupy")
    try:
        found = all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:  # The "nvidia" namespace itself is missing.
        found = False
    return found and jax.default_backend() == "gpu"


CUDA_CONNECTIONS = "32"  # CUDA_DEVICE_MAX_CONNECTIONS for GPU decoding (CUDA's default: 8)


def share_gpu_with_training() -> None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS`` to ``CUDA_CONNECTIONS`` unless the environment sets
    it: the decoders' CUDA streams then get hardware queues of their own instead of queueing
    behind the training step (see the module docstring). CUDA reads it when the context is
    created, so call this before JAX first uses the GPU; later it has no effect."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_CONNECTIONS)


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """grain ``random_map`` callable: record {"image": JPEG bytes, "label": int} ->
    {"jpeg": uint8 (n,), "box": int32 (4,) (top, left, height, width), "flip": bool,
    "label": int32}; the random choices are ``imagenet_train``'s for the same ``rng``. A JPEG
    past the pixel budget is refused (``limits.ImageTooLargeError``) before the GPU sees it."""

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        payload = bytes(record["image"])
        height, width = image_size(payload)
        check_image_pixels(height, width, "dataset image")
        box, flip = imagenet_train_plan(height, width, rng)
        return {
            "jpeg": np.frombuffer(payload, np.uint8),
            "box": np.asarray(box, np.int32),
            "flip": np.bool_(flip),
            "label": np.int32(record["label"]),
        }


def collate_plans(plans: Sequence[dict]) -> dict[str, np.ndarray]:
    """grain ``batch_fn``: B plans -> {"jpeg": uint8 (sum n,), "offsets": int64 (B + 1,),
    "box": int32 (B, 4), "flip": bool (B,), "label": int32 (B,)}."""
    lengths = [len(p["jpeg"]) for p in plans]
    return {
        "jpeg": np.concatenate([p["jpeg"] for p in plans]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "box": np.stack([p["box"] for p in plans]),
        "flip": np.stack([p["flip"] for p in plans]),
        "label": np.stack([p["label"] for p in plans]),
    }


def _antialiased_bilinear_weights(lengths: jax.Array, size: int, canvas: int) -> jax.Array:
    """(B, size, canvas) float32 rows that resample the first ``lengths[b]`` samples of a
    canvas line to ``size`` samples: the triangle filter widened by the downscale factor
    (antialiasing), pixel centres aligned, each row normalised to sum 1."""
    scale = lengths.astype(jnp.float32)[:, None, None] / size  # (B, 1, 1)
    support = jnp.maximum(scale, 1.0)
    centre = (jnp.arange(size, dtype=jnp.float32)[None, :, None] + 0.5) * scale
    source = jnp.arange(canvas, dtype=jnp.float32)[None, None, :] + 0.5
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(source - centre) / support)
    weights = jnp.where(source < lengths[:, None, None], weights, 0.0)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames="size")
def resize_crops(
    canvas: jax.Array, heights: jax.Array, widths: jax.Array, flips: jax.Array, size: int
) -> jax.Array:
    """Resample each crop of a zero-padded batch to uint8 (B, size, size, C).

    canvas: uint8 (B, H, W, C), crop b in ``canvas[b, :heights[b], :widths[b]]``; flips: bool
    (B,), mirror left-right. Antialiased bilinear, as Pillow's ``BILINEAR`` resize.
    """
    _, height, width, _ = canvas.shape
    rows = _antialiased_bilinear_weights(heights, size, height)  # (B, size, H)
    cols = _antialiased_bilinear_weights(widths, size, width)  # (B, size, W)
    cols = jnp.where(flips[:, None, None], cols[:, ::-1], cols)
    pixels = canvas.astype(jnp.float32)
    out = jnp.einsum("bsh,bhwc->bswc", rows, pixels)
    out = jnp.einsum("btw,bswc->bstc", cols, out)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


class GpuJpegDecoder:
    """Decodes a collated batch of crop plans on the GPU into {"image": uint8 (B, size, size,
    3), "label": int32 (B,)} device arrays (see the module docstring).

    ``region_decode``: decode only each crop box (nvImageCodec's region of interest), or the
    whole image and crop it on the GPU. Each calling thread gets an nvImageCodec decoder and a
    CUDA stream of its own, so decoding overlaps the training step and several threads can
    decode consecutive batches at once (``prefetch_to_device(..., threads=n)``); call it from
    prefetch threads, not the one that dispatches steps.
    """

    def __init__(self, size: int, *, region_decode: bool = True):
        import cupy
        from nvidia import nvimgcodec

        self.size = size
        self.region_decode = region_decode
        self._cupy = cupy
        self._nvimgcodec = nvimgcodec
        # sRGB uint8, interleaved (the defaults); EXIF orientation ignored as on the CPU path.
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
        self._per_thread = threading.local()  # A decoder and a CUDA stream for each thread.

    @property
    def _decoder(self) -> Any:
        if not hasattr(self._per_thread, "decoder"):
            self._per_thread.decoder = self._nvimgcodec.Decoder()
        return self._per_thread.decoder

    @property
    def _stream(self) -> Any:
        if not hasattr(self._per_thread, "stream"):
            self._per_thread.stream = self._cupy.cuda.Stream(non_blocking=True)
        return self._per_thread.stream

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        codec = self._nvimgcodec
        boxes = batch["box"].astype(np.int64)
        streams = []
        for i, (top, left, height, width) in enumerate(boxes.tolist()):
            stream = codec.CodeStream(batch["jpeg"][batch["offsets"][i] : batch["offsets"][i + 1]])
            if self.region_decode:
                region = codec.Region(top, left, top + height, left + width)
                stream = stream.get_sub_code_stream(region=region)
            streams.append(stream)
        heights, widths = boxes[:, 2], boxes[:, 3]
        with self._stream:
            decoded = self._decoder.decode(
                streams, params=self._params, cuda_stream=self._stream.ptr
            )
            if any(image is None for image in decoded):
                failed = [i for i, image in enumerate(decoded) if image is None]
                raise ValueError(f"nvImageCodec could not decode images {failed} of the batch")
            canvas = self._gather(
                decoded, boxes, canvas_side(heights.max()), canvas_side(widths.max())
            )
            pixels = jnp.from_dlpack(canvas)
        images = resize_crops(
            pixels,
            jnp.asarray(heights),
            jnp.asarray(widths),
            jnp.asarray(batch["flip"]),
            self.size,
        )
        return {"image": images, "label": jnp.asarray(batch["label"])}

    def _gather(self, decoded: list, boxes: np.ndarray, height: int, width: int) -> Any:
        """One kernel launch: each image's crop into a zero-padded uint8 (B, height, width, 3)
        CuPy canvas on this decoder's stream; returns once the copies are done (the decoded
        images may then be freed)."""
        cupy = self._cupy
        sources = np.empty(len(decoded), np.uint64)
        pitches = np.empty(len(decoded), np.int64)
        for i, image in enumerate(decoded):
            interface = image.__cuda_array_interface__
            row_bytes = interface["shape"][1] * 3
            pitches[i] = interface["strides"][0] if interface["strides"] else row_bytes
            sources[i] = interface["data"][0]
        if not self.region_decode:  # Whole images: start each copy at the crop's corner.
            sources += (boxes[:, 0] * pitches + boxes[:, 1] * 3).astype(np.uint64)
        canvas = cupy.empty((len(decoded), height, width, 3), cupy.uint8)
        block = (32, 8, 1)
        grid = (-(-width // block[0]), -(-height // block[1]), len(decoded))
        args = (
            cupy.asarray(sources),
            cupy.asarray(pitches),
            cupy.asarray(boxes[:, 2].astype(np.int32)),
            cupy.asarray(boxes[:, 3].astype(np.int32)),
            canvas,
            np.int32(height),
            np.int32(width),
        )
        self._gather_kernel(grid, block, args)
        self._stream.synchronize()
        return canvas

    @functools.cached_property
    def _gather_kernel(self) -> Any:
        return self._cupy.RawKernel(_GATHER_CROPS, "gather_crops")


# Canvas pixel (b, y, x): crop b's pixel (y, x) inside its height x width, 0 outside.
_GATHER_CROPS = r"""
extern "C" __global__ void gather_crops(
    const unsigned long long* sources, const long long* pitches, const int* heights,
    const int* widths, unsigned char* canvas, int height, int width) {
  const int b = blockIdx.z;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= height || x >= width) return;
  unsigned char* out = canvas + ((static_cast<long long>(b) * height + y) * width + x) * 3;
  if (y < heights[b] && x < widths[b]) {
    const unsigned char* in =
        reinterpret_cast<const unsigned char*>(sources[b]) + y * pitches[b] + x * 3;
    out[0] = in[0];
    out[1] = in[1];
    out[2] = in[2];
  } else {
    out[0] = 0;
    out[1] = 0;
    out[2] = 0;
  }
}
"""


def canvas_side(length: int) -> int:
    """The canvas side that holds ``length`` pixels: the next of 64, 96, 128, 192, 256, 384,
    ... (a power of two or 1.5 times one), so a run compiles ``resize_crops`` for few shapes
    and wastes at most a third of a side."""
    side = 64
    while True:
        for candidate in (side, side * 3 // 2):
            if candidate >= length:
                return candidate
        side *= 2
