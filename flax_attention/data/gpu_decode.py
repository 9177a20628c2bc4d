"""JPEG decoding on the GPU: the host reads records and draws the crops, each GPU decodes its rows.

A batch goes through three stages:

1. Host, per record (``plans.CropPlan`` for training, ``plans.CenterCropPlan`` for evaluation):
   read the JPEG header for the image's size and colour space and choose the crop (the same
   generator and arithmetic as the CPU decoder, so both choose the same crop and flip for a
   record). No pixel is decoded, except for images the GPU does not take (``plans``).
2. Host, per batch (``plans.collate_plans``): the batch's JPEG bytes in one uint8 array with
   offsets, plus boxes, flips, labels and the host-decoded rows' pixels.
3. GPU (``GpuJpegDecoder``, one per device, ``per_device.PerDeviceDecoder`` gives each its rows):
   nvImageCodec decodes the crop boxes (the region of interest: only the crop's pixels are
   produced) in groups of at most ``DECODE_GROUP_BYTES`` of decoded pixels; one CUDA kernel
   (through CuPy) box-averages each crop by whole factors (``reduction_factors``) into a fixed
   (B, side, side, 3) uint8 canvas, ``side = CANVAS_SCALE * size``, and the host-decoded rows
   are copied into their canvas rows; JAX takes the canvas over through DLPack without a copy
   and ``resize_crops`` (one jitted program: the canvas shape never changes) resamples every
   crop to (size, size) with an antialiased bilinear filter (Pillow's and torchvision's
   ``antialias=True``), mirrors and rounds back to uint8. Normalisation stays in the step.

Memory is bounded whatever the image sizes: per decoding thread and device, the canvas (B x
side x side x 3 bytes) and one decode group; CuPy's pool is capped at ``CUPY_POOL_LIMIT`` per
device, CUDA's stream-ordered pool (where nvImageCodec allocates the decoded crops) keeps at
most ``DECODED_POOL_KEEP`` of freed memory for the next batch, and, unless the user sets it,
XLA's preallocated share of each GPU (``XLA_PYTHON_CLIENT_MEM_FRACTION``) leaves
``GPU_RESERVE_BYTES`` outside XLA (``reserve_gpu_memory``). The box average before the resize
differs from the CPU decoder's area resize by a rounding step; both are antialiasing filters
(docs/input.md gives the measured difference).

Decoding shares the GPU with the training step: nvJPEG's hardware decoder follows each image
with a small conversion kernel on a stream of its own. With CUDA's default of 8 hardware work
queues per context, those streams share queues with XLA's and each kernel waits behind the
training step's queued kernels: on one H200 a batch then took 157 ms to decode instead of 34 ms.
``share_gpu_with_training`` raises the queue count before the GPU is first used.

GPU decoding needs ``nvidia-nvimgcodec-cu13`` (with ``nvidia-nvjpeg``) and ``cupy-cuda13x``:
``pip install 'flax-attention[gpu-decode]'``. ``CpuCanvasDecoder`` computes the same canvas
and resize on the host (libjpeg-turbo, numpy): the reference the GPU decoder is checked against,
and its stand-in where there is no GPU.
"""

import dataclasses
import functools
import importlib.util
import math
import os
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.data.decode import decode_image
from flax_attention.data.preprocess import crop

CANVAS_SCALE = 2  # canvas side / output side: crops larger than this are box-averaged first
DECODE_GROUP_BYTES = 256 << 20  # decoded crop pixels held at once, per thread and device
CUPY_POOL_LIMIT = 1 << 30  # CuPy's memory pool, per device (canvases of the decoding threads)
# Freed memory CUDA's stream-ordered pool keeps per device for nvImageCodec's decoded crops
# (CUDA's default, 0, unmaps it at every synchronisation and maps it again for the next batch).
DECODED_POOL_KEEP = 1 << 30
_RELEASE_THRESHOLD = 4  # cudaMemPoolAttrReleaseThreshold
GPU_RESERVE_BYTES = 4 << 30  # GPU memory left outside XLA: decoder, CUDA and codec state
XLA_DEFAULT_FRACTION = 0.75  # JAX's own default share of GPU memory


def gpu_decoding_available() -> bool:
    """Whether every local JAX device is a CUDA GPU and nvImageCodec and CuPy can be
    imported (starts JAX's backends)."""
    modules = ("nvidia.nvimgcodec", "cupy")
    try:
        found = all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:  # The "nvidia" namespace itself is missing.
        found = False
    return found and all(d.platform == "gpu" for d in jax.local_devices())


CUDA_CONNECTIONS = "32"  # CUDA_DEVICE_MAX_CONNECTIONS for GPU decoding (CUDA's default: 8)


def share_gpu_with_training() -> None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS`` to ``CUDA_CONNECTIONS`` unless the environment sets
    it: the decoders' CUDA streams then get hardware queues of their own instead of queueing
    behind the training step (see the module docstring). CUDA reads it when the context is
    created, so call this before JAX first uses the GPU; later it has no effect."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_CONNECTIONS)


def gpu_memory_bytes() -> int | None:
    """The smallest total memory of this machine's NVIDIA GPUs (``nvidia-smi``, no CUDA
    context made), or None when it cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return min(int(line) for line in out.split()) << 20
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def xla_memory_fraction(total_bytes: int) -> float:
    """XLA's share of a GPU of ``total_bytes`` beside the decoder: JAX's default, lowered so
    that at least ``GPU_RESERVE_BYTES`` stay outside XLA; two decimals, rounded down."""
    fraction = min(XLA_DEFAULT_FRACTION, 1.0 - GPU_RESERVE_BYTES / total_bytes)
    return max(math.floor(fraction * 100) / 100, 0.1)


def reserve_gpu_memory() -> None:
    """Set ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (``xla_memory_fraction`` of the smallest GPU)
    unless the environment sets it or no GPU memory can be read; call it before JAX first uses
    the GPU."""
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
        return
    total = gpu_memory_bytes()
    if total is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{xla_memory_fraction(total):.2f}"


@dataclasses.dataclass(frozen=True)
class CanvasLayout:
    """Where the rows of a plan batch of B rows lie on a (B, side, side, 3) canvas: row b holds
    its crop box-averaged by ``factors[b]`` (int32 (B, 2), per axis) in its top-left
    ``heights[b]`` x ``widths[b]``; ``jpeg_rows`` are decoded from their bytes, the others
    (``pixel_rows``) copied from the batch's host pixels (factors 1, size S x S)."""

    side: int
    factors: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    jpeg_rows: np.ndarray


def canvas_side(size: int) -> int:
    """The canvas side for an output side ``size``: ``CANVAS_SCALE * size``."""
    return CANVAS_SCALE * size


def reduction_factors(lengths: np.ndarray, side: int) -> np.ndarray:
    """The smallest whole factors that bring crop ``lengths`` (any int array) within ``side``."""
    return np.maximum(-(-np.asarray(lengths) // side), 1).astype(np.int32)


def canvas_layout(batch: dict[str, np.ndarray], size: int) -> CanvasLayout:
    """The canvas layout of a plan batch (``plans.collate_plans``) for output side ``size``."""
    side = canvas_side(size)
    lengths = batch["box"][:, 2:].astype(np.int64)
    factors = reduction_factors(lengths, side)
    reduced = (lengths // factors).astype(np.int32)
    jpeg_rows = np.setdiff1d(np.arange(len(lengths)), batch["pixel_rows"])
    return CanvasLayout(side, factors, reduced[:, 0], reduced[:, 1], jpeg_rows)


def reduce_crop(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """uint8 (h, w, C) -> (h // fy, w // fx, C): the mean of each fy x fx block, rounded half
    up (trailing rows and columns of a partial block dropped). What the GPU kernel computes."""
    fy, fx = int(factors[0]), int(factors[1])
    height, width = image.shape[0] // fy, image.shape[1] // fx
    blocks = image[: height * fy, : width * fx].reshape(height, fy, width, fx, -1)
    count = fy * fx
    return ((blocks.astype(np.uint32).sum(axis=(1, 3)) + count // 2) // count).astype(np.uint8)


def host_reduced_crop(payload: bytes, box: Sequence[int], factors: Sequence[int]) -> np.ndarray:
    """A JPEG's crop ``box`` decoded on the host (libjpeg-turbo) and box-averaged by
    ``factors``: uint8 (h // fy, w // fx, 3)."""
    image = crop(decode_image(payload, 3), tuple(int(v) for v in box))
    return reduce_crop(image, factors)


def decode_groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive runs of indices of ``sizes`` whose sums stay within ``budget`` (an item
    larger than it alone)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, size in enumerate(sizes):
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


class DecoderMemory:
    """GPU memory the decoders hold (canvases and decoded crops), per device id: bytes in use
    now and the peak since ``reset``. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: Counter[int] = Counter()
        self._peak: Counter[int] = Counter()

    def hold(self, device_id: int, nbytes: int) -> None:
        with self._lock:
            self._in_use[device_id] += nbytes
            self._peak[device_id] = max(self._peak[device_id], self._in_use[device_id])

    def release(self, device_id: int, nbytes: int) -> None:
        with self._lock:
            self._in_use[device_id] -= nbytes

    def peak_bytes(self) -> dict[int, int]:
        """{device id: the most bytes held at once}."""
        with self._lock:
            return dict(self._peak)

    def reset(self) -> None:
        with self._lock:
            self._peak = Counter(self._in_use)


DECODER_MEMORY = DecoderMemory()


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


def finish_canvas(
    canvas: jax.Array, layout: CanvasLayout, flips: np.ndarray, size: int, device: jax.Device
) -> jax.Array:
    """The canvas's crops resized to uint8 (B, size, size, 3) on ``device``."""
    put = functools.partial(jax.device_put, device=device)
    return resize_crops(
        canvas, put(layout.heights), put(layout.widths), put(np.asarray(flips)), size
    )


class CpuCanvasDecoder:
    """``GpuJpegDecoder``'s arithmetic on the host: plan batch -> {"image": uint8 (B, size,
    size, 3) on ``device``} with the same canvas (crops decoded by libjpeg-turbo and
    box-averaged by ``reduce_crop``) and the same jitted resize. The reference for the GPU
    decoder, and its stand-in without a GPU. Thread-safe."""

    def __init__(self, size: int, device: jax.Device | None = None):
        self.size = size
        self.device = device or jax.local_devices()[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        layout = canvas_layout(batch, self.size)
        canvas = np.zeros((len(batch["box"]), layout.side, layout.side, 3), np.uint8)
        for b in layout.jpeg_rows:
            payload = batch["jpeg"][batch["offsets"][b] : batch["offsets"][b + 1]].tobytes()
            reduced = host_reduced_crop(payload, batch["box"][b], layout.factors[b])
            canvas[b, : reduced.shape[0], : reduced.shape[1]] = reduced
        for row, pixels in zip(batch["pixel_rows"], batch["pixels"], strict=True):
            canvas[row, : self.size, : self.size] = pixels
        pixels = jax.device_put(canvas, self.device)
        return {"image": finish_canvas(pixels, layout, batch["flip"], self.size, self.device)}


class GpuJpegDecoder:
    """Decodes a plan batch on one GPU, ``device`` (default: the first local one), into
    {"image": uint8 (B, size, size, 3)} on that device (see the module docstring).

    Each calling thread gets an nvImageCodec decoder and a CUDA stream of its own on the
    device, so decoding overlaps the training step and several threads can decode
    consecutive batches at once; call it from prefetch threads, not the one that dispatches
    steps. A JPEG nvImageCodec cannot decode is decoded on the host (``host_reduced_crop``)
    and joined in.
    """

    def __init__(self, size: int, device: jax.Device | None = None):
        import cupy
        from nvidia import nvimgcodec

        self.size = size
        self.device = device or jax.local_devices()[0]
        self._ordinal = self.device.local_hardware_id
        self._cupy = cupy
        self._nvimgcodec = nvimgcodec
        # sRGB uint8, interleaved (the defaults); EXIF orientation ignored as on the CPU path.
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
        self._per_thread = threading.local()  # A decoder and a CUDA stream for each thread.
        with cupy.cuda.Device(self._ordinal):
            cupy.get_default_memory_pool().set_limit(size=CUPY_POOL_LIMIT)
            runtime = cupy.cuda.runtime
            pool = runtime.deviceGetDefaultMemPool(self._ordinal)
            runtime.memPoolSetAttribute(pool, _RELEASE_THRESHOLD, DECODED_POOL_KEEP)
            self._kernel = cupy.RawKernel(_REDUCE_CROPS, "reduce_crops")

    def _thread_state(self) -> tuple[Any, Any]:
        state = self._per_thread
        if not hasattr(state, "decoder"):
            state.decoder = self._nvimgcodec.Decoder(device_id=self._ordinal)
            state.stream = self._cupy.cuda.Stream(non_blocking=True)
        return state.decoder, state.stream

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        cupy = self._cupy
        layout = canvas_layout(batch, self.size)
        shape = (len(batch["box"]), layout.side, layout.side, 3)
        nbytes = math.prod(shape)
        with cupy.cuda.Device(self._ordinal):
            decoder, stream = self._thread_state()
            with stream:
                DECODER_MEMORY.hold(self._ordinal, nbytes)
                try:
                    canvas = cupy.empty(shape, cupy.uint8)
                    crop_bytes = [int(np.prod(batch["box"][b, 2:])) * 3 for b in layout.jpeg_rows]
                    for group in decode_groups(crop_bytes, DECODE_GROUP_BYTES):
                        rows = layout.jpeg_rows[group]
                        self._decode_rows(batch, layout, rows, canvas, decoder, stream)
                    for row, pixels in zip(batch["pixel_rows"], batch["pixels"], strict=True):
                        _set_canvas_row(canvas, int(row), pixels)
                    stream.synchronize()
                finally:
                    DECODER_MEMORY.release(self._ordinal, nbytes)
                pixels = jnp.from_dlpack(canvas, device=self.device)
        return {"image": finish_canvas(pixels, layout, batch["flip"], self.size, self.device)}

    def _decode_rows(
        self,
        batch: dict[str, np.ndarray],
        layout: CanvasLayout,
        rows: np.ndarray,
        canvas: Any,
        decoder: Any,
        stream: Any,
    ) -> None:
        """Rows ``rows`` decoded (their crop regions), box-averaged into ``canvas`` by one
        kernel launch; returns once the decoded crops may be freed."""
        codec, cupy = self._nvimgcodec, self._cupy
        streams = []
        for b in rows:
            top, left, height, width = (int(v) for v in batch["box"][b])
            payload = batch["jpeg"][batch["offsets"][b] : batch["offsets"][b + 1]]
            region = codec.Region(top, left, top + height, left + width)
            streams.append(codec.CodeStream(payload).get_sub_code_stream(region=region))
        decoded = decoder.decode(streams, params=self._params, cuda_stream=stream.ptr)
        sources = np.zeros(len(rows), np.uint64)
        pitches = np.zeros(len(rows), np.int64)
        held = 0
        for i, image in enumerate(decoded):
            interface = None if image is None else image.__cuda_array_interface__
            if interface is None or interface["shape"][2:] != (3,):
                continue  # Decoded on the host below.
            row_bytes = interface["shape"][1] * 3
            pitches[i] = interface["strides"][0] if interface["strides"] else row_bytes
            sources[i] = interface["data"][0]
            held += int(pitches[i]) * interface["shape"][0]
        DECODER_MEMORY.hold(self._ordinal, held)
        try:
            side = layout.side
            block = (32, 8, 1)
            grid = (-(-side // block[0]), -(-side // block[1]), len(rows))
            factors = layout.factors[rows]
            args = (
                cupy.asarray(rows.astype(np.int32)),
                cupy.asarray(sources),
                cupy.asarray(pitches),
                cupy.asarray(layout.heights[rows]),
                cupy.asarray(layout.widths[rows]),
                cupy.asarray(np.ascontiguousarray(factors[:, 0])),
                cupy.asarray(np.ascontiguousarray(factors[:, 1])),
                canvas,
                np.int32(side),
            )
            self._kernel(grid, block, args)
            for i in np.flatnonzero(sources == 0):
                b = int(rows[i])
                payload = batch["jpeg"][batch["offsets"][b] : batch["offsets"][b + 1]].tobytes()
                _set_canvas_row(
                    canvas, b, host_reduced_crop(payload, batch["box"][b], layout.factors[b])
                )
            stream.synchronize()
        finally:
            DECODER_MEMORY.release(self._ordinal, held)
        del decoded


def _set_canvas_row(canvas: Any, row: int, image: np.ndarray) -> None:
    """Canvas row ``row`` (CuPy, (side, side, 3)) set to uint8 ``image`` (h, w, 3) in its
    top-left, zeros elsewhere: one host-to-device copy on the current stream (indexed CuPy
    assignments would compile a kernel on first use, for hundreds of milliseconds)."""
    side = canvas.shape[1]
    host = np.zeros((side, side, 3), np.uint8)
    host[: image.shape[0], : image.shape[1]] = image
    canvas[row].set(host)


# Canvas pixel (rows[i], y, x): the mean of crop i's factors_y x factors_x block at (y, x)
# inside its heights[i] x widths[i] (already divided by the factors), 0 outside or for a crop
# with no source (decoded on the host instead).
_REDUCE_CROPS = r"""
extern "C" __global__ void reduce_crops(
    const int* rows, const unsigned long long* sources, const long long* pitches,
    const int* heights, const int* widths, const int* factors_y, const int* factors_x,
    unsigned char* canvas, int side) {
  const int i = blockIdx.z;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= side || x >= side) return;
  unsigned char* out = canvas + ((static_cast<long long>(rows[i]) * side + y) * side + x) * 3;
  if (sources[i] == 0 || y >= heights[i] || x >= widths[i]) {
    out[0] = 0;
    out[1] = 0;
    out[2] = 0;
    return;
  }
  const int fy = factors_y[i];
  const int fx = factors_x[i];
  const unsigned char* in = reinterpret_cast<const unsigned char*>(sources[i]) +
                            static_cast<long long>(y) * fy * pitches[i] +
                            static_cast<long long>(x) * fx * 3;
  unsigned int sum0 = 0, sum1 = 0, sum2 = 0;
  for (int dy = 0; dy < fy; ++dy) {
    const unsigned char* line = in + static_cast<long long>(dy) * pitches[i];
    for (int dx = 0; dx < fx; ++dx) {
      sum0 += line[dx * 3];
      sum1 += line[dx * 3 + 1];
      sum2 += line[dx * 3 + 2];
    }
  }
  const unsigned int count = static_cast<unsigned int>(fy * fx);
  out[0] = static_cast<unsigned char>((sum0 + count / 2) / count);
  out[1] = static_cast<unsigned char>((sum1 + count / 2) / count);
  out[2] = static_cast<unsigned char>((sum2 + count / 2) / count);
}
"""
