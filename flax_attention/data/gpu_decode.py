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
   produced) in groups of at most ``DECODE_GROUP_BYTES`` of decoded pixels; per group, one CUDA
   kernel (through CuPy) computes each crop's filter taps and another writes each crop's
   (size, size) output row: the crop read as its box average by whole factors
   (``reduction_factors``: at most ``MAX_SCALE * size`` a side), resampled with an
   antialiased bilinear filter (Pillow's and torchvision's ``antialias=True``), mirrored,
   rounded to uint8. The host-decoded rows are copied in by the same kernels (scale 1: an exact
   copy). JAX takes the uint8 (B, size, size, 3) batch over through DLPack without a copy.
   Normalisation stays in the step. All of it runs on the decoding thread's own CUDA stream,
   beside the training step rather than in its queue.

Memory is bounded whatever the image sizes: per decoding thread and device, the output batch
(B x size x size x 3 bytes) and one decode group; CuPy's pool is capped at ``CUPY_POOL_LIMIT``
per device, CUDA's stream-ordered pool (where nvImageCodec allocates the decoded crops) keeps
at most ``DECODED_POOL_KEEP`` of freed memory for the next batch, and, unless the user sets it,
XLA's preallocated share of each GPU (``XLA_PYTHON_CLIENT_MEM_FRACTION``) leaves
``GPU_RESERVE_BYTES`` outside XLA (``reserve_gpu_memory``). The box average before the resample
differs from the CPU decoder's area resize by a rounding step; both are antialiasing filters
(docs/input.md gives the measured difference).

Decoding shares the GPU with the training step: nvJPEG's hardware decoder follows each image
with a small conversion kernel on a stream of its own. With CUDA's default of 8 hardware work
queues per context, those streams share queues with XLA's and each kernel waits behind the
training step's queued kernels: on one H200 a batch then took 157 ms to decode instead of 34 ms.
``share_gpu_with_training`` raises the queue count before the GPU is first used.

GPU decoding needs ``nvidia-nvimgcodec-cu13`` (with ``nvidia-nvjpeg``) and ``cupy-cuda13x``:
``pip install 'flax-attention[gpu-decode]'``. ``CpuReferenceDecoder`` computes the same box
average and resample on the host (libjpeg-turbo, numpy, the same float32 arithmetic): the
reference the GPU decoder is checked against, and its stand-in where there is no GPU.
"""

import dataclasses
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

MAX_SCALE = 2  # crops longer than this times the output side are box-averaged first
TAPS = 6  # source samples an output sample draws on (at most 4 weigh anything at MAX_SCALE)
RESAMPLE_BLOCK = (32, 8)  # threads of one block of the resampling kernel: columns x rows
RESAMPLE_ROWS_PER_THREAD = 4  # output rows each thread of that kernel resamples
DECODE_GROUP_BYTES = 256 << 20  # decoded crop pixels held at once, per thread and device
CUPY_POOL_LIMIT = 1 << 30  # CuPy's memory pool, per device (the decoding threads' outputs)
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
class CropLayout:
    """How the rows of a plan batch of B rows are resampled to (size, size): row b's crop is
    first box-averaged by ``factors[b]`` (int32 (B, 2), per axis) to ``heights[b]`` x
    ``widths[b]``, at most ``reduced_side(size)`` a side; ``jpeg_rows`` are decoded from their
    bytes, the others (``pixel_rows``) are the batch's host pixels (factors 1, size x size)."""

    factors: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    jpeg_rows: np.ndarray


def reduced_side(size: int) -> int:
    """The longest side a crop keeps before the resample to ``size``: ``MAX_SCALE * size``."""
    return MAX_SCALE * size


def reduction_factors(lengths: np.ndarray, side: int) -> np.ndarray:
    """The smallest whole factors that bring crop ``lengths`` (any int array) within ``side``."""
    return np.maximum(-(-np.asarray(lengths) // side), 1).astype(np.int32)


def crop_layout(batch: dict[str, np.ndarray], size: int) -> CropLayout:
    """The crop layout of a plan batch (``plans.collate_plans``) for output side ``size``."""
    lengths = batch["box"][:, 2:].astype(np.int64)
    factors = reduction_factors(lengths, reduced_side(size))
    reduced = (lengths // factors).astype(np.int32)
    jpeg_rows = np.setdiff1d(np.arange(len(lengths)), batch["pixel_rows"])
    return CropLayout(factors, reduced[:, 0], reduced[:, 1], jpeg_rows)


def reduce_crop(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """uint8 (h, w, C) -> (h // fy, w // fx, C): the mean of each fy x fx block, rounded half
    up (trailing rows and columns of a partial block dropped). What the GPU kernel computes."""
    fy, fx = int(factors[0]), int(factors[1])
    height, width = image.shape[0] // fy, image.shape[1] // fx
    blocks = image[: height * fy, : width * fx].reshape(height, fy, width, fx, -1)
    count = fy * fx
    return ((blocks.astype(np.uint32).sum(axis=(1, 3)) + count // 2) // count).astype(np.uint8)


def jpeg_payload(batch: dict[str, np.ndarray], row: int) -> np.ndarray:
    """Row ``row``'s JPEG bytes in a plan batch (``plans.collate_plans``): a uint8 view."""
    return batch["jpeg"][batch["offsets"][row] : batch["offsets"][row + 1]]


def host_reduced_crop(payload: bytes, box: Sequence[int], factors: Sequence[int]) -> np.ndarray:
    """A JPEG's crop ``box`` decoded on the host (libjpeg-turbo) and box-averaged by
    ``factors``: uint8 (h // fy, w // fx, 3)."""
    image = crop(decode_image(payload, 3), tuple(int(v) for v in box))
    return reduce_crop(image, factors)


def resample_taps(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The antialiased bilinear filter that resamples ``length`` samples to ``size``: source
    indices int64 (size, TAPS) and float32 weights (size, TAPS), output sample t drawing on
    ``sum_k weights[t, k] * line[indices[t, k]]``. The triangle filter widened by the
    downscale factor (Pillow's and torchvision's ``antialias=True``), pixel centres aligned,
    each row normalised to sum 1. Float32 operations in the order the GPU kernel does them,
    so both compute the same weights bit for bit; ``length <= MAX_SCALE * size``."""
    f32 = np.float32
    scale = f32(length) / f32(size)
    support = max(scale, f32(1))
    centre = (np.arange(size, dtype=f32) + f32(0.5)) * scale
    first = np.maximum(np.floor(centre - support - f32(0.5)).astype(np.int64), 0)
    indices = first[:, None] + np.arange(TAPS)
    distance = np.abs((indices.astype(f32) + f32(0.5)) - centre[:, None]) / support
    weights = np.where(indices < length, np.maximum(f32(0), f32(1) - distance), f32(0))
    total = weights[:, 0]
    for k in range(1, TAPS):
        total = total + weights[:, k]
    return np.minimum(indices, length - 1), (weights / total[:, None]).astype(f32)


def resample_crop(reduced: np.ndarray, size: int, flip: bool = False) -> np.ndarray:
    """uint8 (h, w, C) -> uint8 (size, size, C): the crop resampled by ``resample_taps`` on
    both axes, mirrored left-right when ``flip``, rounded half to even: the GPU kernel's
    arithmetic on the host (the same float32 products and sums, in the same order). A crop
    longer than ``reduced_side(size)`` is refused: box-average it first (``reduce_crop``)."""
    if max(reduced.shape[:2]) > reduced_side(size):
        raise ValueError(
            f"a {reduced.shape[0]}x{reduced.shape[1]} crop is past the reduced side "
            f"{reduced_side(size)} of output size {size}: box-average it first"
        )
    down = resample_taps(reduced.shape[0], size)
    cols, col_weights = resample_taps(reduced.shape[1], size)
    if flip:
        cols, col_weights = cols[::-1], col_weights[::-1]
    return resample_with_taps(reduced, down, (cols, col_weights))


def resample_with_taps(
    reduced: np.ndarray,
    down: tuple[np.ndarray, np.ndarray],
    across: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """uint8 (h, w, C) -> uint8 (T, S, C) by the taps of each axis (source indices int64 and
    float32 weights, (T, TAPS) down and (S, TAPS) across, as ``resample_taps`` gives them):
    output (t, s) is ``sum_a down_w[t, a] * sum_b across_w[s, b] * reduced[down_i[t, a],
    across_i[s, b]]`` in float32, in the GPU kernel's order, rounded half to even."""
    (rows, row_weights), (cols, col_weights) = down, across
    pixels = reduced.astype(np.float32)
    out = np.zeros((len(rows), len(cols), reduced.shape[2]), np.float32)
    for a in range(TAPS):
        line = pixels[rows[:, a]]  # (T, w, C)
        resampled = np.zeros_like(out)
        for b in range(TAPS):
            resampled = resampled + col_weights[None, :, b, None] * line[:, cols[:, b]]
        out = out + row_weights[:, a, None, None] * resampled
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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
    """GPU memory the decoders hold (output batches and decoded crops), per device id: bytes in use
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


class CpuReferenceDecoder:
    """``GpuJpegDecoder``'s arithmetic on the host: plan batch -> {"image": uint8 (B, size,
    size, 3) on ``device``}, each crop decoded by libjpeg-turbo, box-averaged by
    ``reduce_crop`` and resampled by ``resample_crop``. The reference for the GPU decoder, and
    its stand-in without a GPU. Thread-safe."""

    def __init__(self, size: int, device: jax.Device | None = None):
        self.size = size
        self.device = device or jax.local_devices()[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        layout = crop_layout(batch, self.size)
        out = np.zeros((len(batch["box"]), self.size, self.size, 3), np.uint8)
        for b in layout.jpeg_rows:
            reduced = host_reduced_crop(
                jpeg_payload(batch, b).tobytes(), batch["box"][b], layout.factors[b]
            )
            out[b] = resample_crop(reduced, self.size, bool(batch["flip"][b]))
        for row, pixels in zip(batch["pixel_rows"], batch["pixels"], strict=True):
            out[row] = pixels
        return {"image": jax.device_put(out, self.device)}


# The per-row arguments of the resampling kernel, one int64 row each (_ROW_FIELDS columns).
_ROW_FIELDS = ("row", "source", "pitch", "height", "width", "factor_y", "factor_x", "flip")


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
            # No fused multiply-adds: the products and sums of ``resample_crop``, bit for bit.
            module = cupy.RawModule(code=_RESAMPLE_CROPS, options=("--fmad=false",))
            module.compile()  # Here, not at the first batch.
            self._taps = module.get_function("crop_taps")
            self._kernel = module.get_function("resample_crops")

    def _thread_state(self) -> tuple[Any, Any]:
        state = self._per_thread
        if not hasattr(state, "decoder"):
            state.decoder = self._nvimgcodec.Decoder(device_id=self._ordinal)
            state.stream = self._cupy.cuda.Stream(non_blocking=True)
        return state.decoder, state.stream

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        cupy = self._cupy
        layout = crop_layout(batch, self.size)
        shape = (len(batch["box"]), self.size, self.size, 3)
        nbytes = math.prod(shape)
        with cupy.cuda.Device(self._ordinal):
            decoder, stream = self._thread_state()
            with stream:
                DECODER_MEMORY.hold(self._ordinal, nbytes)
                try:
                    out = cupy.empty(shape, cupy.uint8)
                    crop_bytes = [int(np.prod(batch["box"][b, 2:])) * 3 for b in layout.jpeg_rows]
                    for group in decode_groups(crop_bytes, DECODE_GROUP_BYTES):
                        rows = layout.jpeg_rows[group]
                        self._decode_rows(batch, layout, rows, out, decoder, stream)
                    self._copy_pixel_rows(batch, out, stream)
                finally:
                    DECODER_MEMORY.release(self._ordinal, nbytes)
                images = jnp.from_dlpack(out, device=self.device)
        return {"image": images}

    def _resample(self, fields: np.ndarray, out: Any, stream: Any) -> None:
        """For each row of ``fields`` (int64 (R, len(_ROW_FIELDS))), ``out[row]`` <- its source
        crop box-averaged and resampled: two kernel launches on ``stream`` (the crops' taps,
        then the pixels); returns once they are done."""
        if not len(fields):
            return
        cupy, size = self._cupy, self.size
        crops = cupy.asarray(fields)
        first = cupy.empty((len(fields), 2, size), cupy.int32)
        weights = cupy.empty((len(fields), 2, size, TAPS), cupy.float32)
        tables = first.nbytes + weights.nbytes
        DECODER_MEMORY.hold(self._ordinal, tables)
        try:
            field_count = np.int32(len(_ROW_FIELDS))
            samples = 128  # output samples a block of crop_taps computes
            taps_grid = (-(-2 * size // samples), len(fields))
            self._taps(taps_grid, (samples,), (crops, field_count, np.int32(size), first, weights))
            columns, rows = RESAMPLE_BLOCK
            out_rows = rows * RESAMPLE_ROWS_PER_THREAD
            grid = (-(-size // columns), -(-size // out_rows), len(fields))
            args = (crops, field_count, first, weights, out, np.int32(size))
            self._kernel(grid, (columns, rows, 1), args)
            stream.synchronize()
        finally:
            DECODER_MEMORY.release(self._ordinal, tables)

    def _copy_pixel_rows(self, batch: dict[str, np.ndarray], out: Any, stream: Any) -> None:
        """The batch's host pixel rows (already size x size, unflipped) into ``out``: one
        host-to-device copy, then the kernels (an exact copy at scale 1)."""
        rows = batch["pixel_rows"]
        if not len(rows):
            return
        pixels = self._cupy.asarray(batch["pixels"])
        fields = np.zeros((len(rows), len(_ROW_FIELDS)), np.int64)
        row_bytes = self.size * self.size * 3
        fields[:, 0] = rows
        fields[:, 1] = pixels.data.ptr + np.arange(len(rows), dtype=np.int64) * row_bytes
        fields[:, 2] = self.size * 3
        fields[:, 3:5] = self.size
        fields[:, 5:7] = 1
        fields[:, 7] = batch["flip"][rows]
        self._resample(fields, out, stream)  # Returns before the staged pixels are freed.

    def _decode_rows(
        self,
        batch: dict[str, np.ndarray],
        layout: CropLayout,
        rows: np.ndarray,
        out: Any,
        decoder: Any,
        stream: Any,
    ) -> None:
        """Rows ``rows`` decoded (their crop regions) and resampled into ``out`` by one kernel
        launch; returns once the decoded crops may be freed."""
        codec = self._nvimgcodec
        streams = []
        for b in rows:
            top, left, height, width = (int(v) for v in batch["box"][b])
            payload = jpeg_payload(batch, b)
            region = codec.Region(top, left, top + height, left + width)
            streams.append(codec.CodeStream(payload).get_sub_code_stream(region=region))
        decoded = decoder.decode(streams, params=self._params, cuda_stream=stream.ptr)
        fields = np.zeros((len(rows), len(_ROW_FIELDS)), np.int64)
        fields[:, 0] = rows
        fields[:, 3] = layout.heights[rows]
        fields[:, 4] = layout.widths[rows]
        fields[:, 5:7] = layout.factors[rows]
        fields[:, 7] = batch["flip"][rows]
        held, on_host = 0, []
        for i, image in enumerate(decoded):
            interface = None if image is None else image.__cuda_array_interface__
            if interface is None or interface["shape"][2:] != (3,):
                # Decoded and box-averaged on the host, then resampled like the others.
                b = int(rows[i])
                reduced = self._cupy.asarray(
                    host_reduced_crop(
                        jpeg_payload(batch, b).tobytes(), batch["box"][b], layout.factors[b]
                    )
                )
                on_host.append(reduced)
                fields[i, 1:3] = reduced.data.ptr, reduced.shape[1] * 3
                fields[i, 5:7] = 1
                continue
            row_bytes = interface["shape"][1] * 3
            fields[i, 1] = interface["data"][0]
            fields[i, 2] = interface["strides"][0] if interface["strides"] else row_bytes
            held += int(fields[i, 2]) * interface["shape"][0]
        DECODER_MEMORY.hold(self._ordinal, held)
        try:
            self._resample(fields, out, stream)
        finally:
            DECODER_MEMORY.release(self._ordinal, held)
        del decoded, on_host


# Two kernels, compiled without fused multiply-adds so that they do ``resample_taps``,
# ``reduce_crop`` and ``resample_crop``'s float32 operations in the same order, bit for bit.
#
# ``crop_taps``: for each crop i (``fields`` row i, _ROW_FIELDS) and output sample t of each
# axis (0 across, mirrored when flip; 1 down), the first source sample it draws on and its
# TAPS weights: first[(i * 2 + axis) * size + t], weights[that * TAPS + k].
#
# ``resample_crops``: output pixel (rows[i], t, s) of size x size, crop i read as its box
# average by factor_y x factor_x (rounded half up) and resampled by those taps on both axes,
# rounded half to even; zero-weight taps skipped (adding zero changes no sum). Separably: a
# block of OUT_ROWS x BLOCK_X outputs first resamples across each box-averaged row its outputs
# draw on (at most SPAN, as a crop is at most MAX_SCALE times the output side) into shared
# memory, then down its columns, ROWS_PER_THREAD outputs a thread.
_RESAMPLE_CROPS = (
    f"#define TAPS {TAPS}\n#define MAX_SCALE {MAX_SCALE}\n"
    f"#define BLOCK_X {RESAMPLE_BLOCK[0]}\n#define BLOCK_Y {RESAMPLE_BLOCK[1]}\n"
    f"#define ROWS_PER_THREAD {RESAMPLE_ROWS_PER_THREAD}\n"
    + r"""
#define OUT_ROWS (BLOCK_Y * ROWS_PER_THREAD)
#define SPAN (OUT_ROWS * MAX_SCALE + TAPS)

extern "C" __global__ void crop_taps(
    const long long* fields, int field_count, int size, int* first, float* weights) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= 2 * size) return;
  const long long* f = fields + static_cast<long long>(blockIdx.y) * field_count;
  const int across = n < size;
  const int t = across ? (f[7] ? size - 1 - n : n) : n - size;
  const int length = static_cast<int>(across ? f[4] : f[3]);
  const float scale = static_cast<float>(length) / static_cast<float>(size);
  const float support = fmaxf(scale, 1.0f);
  const float centre = (static_cast<float>(t) + 0.5f) * scale;
  const int start = max(static_cast<int>(floorf(centre - support - 0.5f)), 0);
  float w[TAPS];
  float total = 0.0f;
#pragma unroll
  for (int k = 0; k < TAPS; ++k) {
    const int j = start + k;
    const float distance = fabsf((static_cast<float>(j) + 0.5f) - centre) / support;
    w[k] = j < length ? fmaxf(0.0f, 1.0f - distance) : 0.0f;
    total = total + w[k];
  }
  const long long slot = static_cast<long long>(blockIdx.y) * 2 * size + n;
  first[slot] = start;
#pragma unroll
  for (int k = 0; k < TAPS; ++k) weights[slot * TAPS + k] = w[k] / total;
}

extern "C" __global__ void resample_crops(
    const long long* fields, int field_count, const int* first, const float* weights,
    unsigned char* out, int size) {
  __shared__ int first_x[BLOCK_X], first_y[OUT_ROWS];
  __shared__ float wx[BLOCK_X][TAPS], wy[OUT_ROWS][TAPS];
  __shared__ float across[SPAN][BLOCK_X][3];  // box-averaged rows resampled across
  const long long* f = fields + static_cast<long long>(blockIdx.z) * field_count;
  const int height = static_cast<int>(f[3]);
  const int s = blockIdx.x * BLOCK_X + threadIdx.x;
  const int row0 = blockIdx.y * OUT_ROWS;
  const int block_rows = min(OUT_ROWS, size - row0);
  const long long across_slot = static_cast<long long>(blockIdx.z) * 2 * size;
  if (threadIdx.y == 0 && s < size) {
    first_x[threadIdx.x] = first[across_slot + s];
    for (int k = 0; k < TAPS; ++k) wx[threadIdx.x][k] = weights[(across_slot + s) * TAPS + k];
  }
  if (threadIdx.y == 1) {
    for (int r = threadIdx.x; r < block_rows; r += BLOCK_X) {
      const long long slot = across_slot + size + row0 + r;
      first_y[r] = first[slot];
      for (int k = 0; k < TAPS; ++k) wy[r][k] = weights[slot * TAPS + k];
    }
  }
  __syncthreads();
  // The block's outputs draw on box-averaged rows top .. top + span - 1 (a row past the
  // crop weighs nothing).
  const int top = first_y[0];
  const int span = min(first_y[block_rows - 1] + TAPS, height) - top;
  const unsigned char* source = reinterpret_cast<const unsigned char*>(f[1]);
  const long long pitch = f[2];
  const int fy = static_cast<int>(f[5]), fx = static_cast<int>(f[6]);
  const unsigned int count = static_cast<unsigned int>(fy * fx);
  if (s < size) {
    float w[TAPS];
#pragma unroll
    for (int k = 0; k < TAPS; ++k) w[k] = wx[threadIdx.x][k];
    const unsigned char* column = source + static_cast<long long>(first_x[threadIdx.x]) * fx * 3;
    for (int r = threadIdx.y; r < span; r += BLOCK_Y) {
      const unsigned char* line = column + static_cast<long long>(top + r) * fy * pitch;
      float sums[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < TAPS; ++k) {
        if (w[k] == 0.0f) continue;
        const unsigned char* block = line + k * fx * 3;
        if (count == 1) {
          for (int c = 0; c < 3; ++c) sums[c] = sums[c] + w[k] * static_cast<float>(block[c]);
          continue;
        }
        unsigned int sum[3] = {0, 0, 0};
        for (int dy = 0; dy < fy; ++dy) {
          const unsigned char* p = block + static_cast<long long>(dy) * pitch;
          for (int dx = 0; dx < fx; ++dx) {
            sum[0] += p[dx * 3];
            sum[1] += p[dx * 3 + 1];
            sum[2] += p[dx * 3 + 2];
          }
        }
        for (int c = 0; c < 3; ++c) {
          const unsigned int mean = (sum[c] + count / 2) / count;
          sums[c] = sums[c] + w[k] * static_cast<float>(mean);
        }
      }
      for (int c = 0; c < 3; ++c) across[r][threadIdx.x][c] = sums[c];
    }
  }
  __syncthreads();
  if (s >= size) return;
  for (int j = 0; j < ROWS_PER_THREAD; ++j) {
    const int y = threadIdx.y + j * BLOCK_Y;
    if (y >= block_rows) return;
    const int offset = first_y[y] - top;
    float acc[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int a = 0; a < TAPS; ++a) {
      const float weight = wy[y][a];
      if (weight == 0.0f) continue;
      for (int c = 0; c < 3; ++c) acc[c] = acc[c] + weight * across[offset + a][threadIdx.x][c];
    }
    unsigned char* pixel = out + ((static_cast<long long>(f[0]) * size + row0 + y) * size + s) * 3;
    for (int c = 0; c < 3; ++c) {
      pixel[c] = static_cast<unsigned char>(fminf(fmaxf(rintf(acc[c]), 0.0f), 255.0f));
    }
  }
}
"""
)
