"""``GpuJpegDecoder``'s host side on machines without a GPU: CuPy and nvImageCodec replaced by
stand-ins that keep "device" memory in numpy arrays behind fake pointers, and the resampling
kernels by their specification (the taps of ``resample_taps``; ``reduce_crop`` then
``resample_with_taps`` with the taps given, on the memory a row's fields point to). What this
checks is the plumbing the kernels are fed: crop regions, pitches, factors, flips, decode
groups, host-decoded rows and the host fallback; the kernels' own arithmetic is checked against
``CpuReferenceDecoder`` on a GPU (``lab/gpu_decode_check``)."""

import contextlib
import sys
import types

import jax
import numpy as np
import pytest

from flax_attention import data
from flax_attention.data import gpu_decode
from flax_attention.data.decode import decode_image
from flax_attention.data.preprocess import crop

PITCH_PADDING = 40  # bytes after each decoded row: the kernel must follow the pitch


class Memory:
    """Fake device memory: numpy buffers at fake addresses."""

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.next = 1 << 20

    def put(self, array: np.ndarray) -> int:
        ptr = self.next
        self.buffers[ptr] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.next += array.nbytes + 4096
        return ptr

    def at(self, ptr: int) -> np.ndarray:
        """The bytes from ``ptr`` to the end of its buffer."""
        base = max(b for b in self.buffers if b <= ptr)
        return self.buffers[base][ptr - base :]


class DeviceArray:
    def __init__(self, memory: Memory, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        self.shape, self.nbytes = self.array.shape, self.array.nbytes
        self.data = types.SimpleNamespace(ptr=memory.put(self.array))  # shares self.array


def stand_in_cupy(memory: Memory, launches: list) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.uint8, cupy.int32, cupy.float32 = np.uint8, np.int32, np.float32

    class Stream:
        ptr = 7

        def __init__(self, non_blocking=False):
            pass

        def synchronize(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def crop_taps(grid, block, args):
        """Each crop's taps as ``resample_taps`` gives them (across mirrored when flipped)."""
        fields, field_count, size, first, weights = args
        assert grid[1] == len(fields.array) and field_count == len(gpu_decode._ROW_FIELDS)
        assert grid[0] * block[0] >= 2 * size
        for i, (_, _, _, height, width, _, _, flip) in enumerate(fields.array.tolist()):
            cols, col_weights = gpu_decode.resample_taps(width, int(size))
            if flip:
                cols, col_weights = cols[::-1], col_weights[::-1]
            rows, row_weights = gpu_decode.resample_taps(height, int(size))
            first.array[i] = cols[:, 0], rows[:, 0]
            weights.array[i] = col_weights, row_weights

    def resample_crops(grid, block, args):
        """Each crop box-averaged (``reduce_crop``) and resampled by the taps it is given."""
        fields, field_count, first, weights, out, _ = args
        assert grid[2] == len(fields.array) and field_count == len(gpu_decode._ROW_FIELDS)
        launches.append(len(fields.array))
        taps = np.arange(gpu_decode.TAPS)
        for i, (row, source, pitch, height, width, fy, fx, _) in enumerate(fields.array.tolist()):
            lines = memory.at(source)[: height * fy * pitch].reshape(height * fy, pitch)
            image = lines[:, : width * fx * 3].reshape(height * fy, width * fx, 3)
            reduced = gpu_decode.reduce_crop(image, (fy, fx))
            cols = np.minimum(first.array[i, 0][:, None] + taps, width - 1)
            rows = np.minimum(first.array[i, 1][:, None] + taps, height - 1)
            col_weights, row_weights = weights.array[i]
            out.array[row] = gpu_decode.resample_with_taps(
                reduced, (rows, row_weights), (cols, col_weights)
            )

    class RawModule:
        def __init__(self, code, options=()):
            assert "--fmad=false" in options

        def compile(self):
            pass

        def get_function(self, name):
            return {"crop_taps": crop_taps, "resample_crops": resample_crops}[name]

    cupy.cuda = types.SimpleNamespace(
        Device=lambda ordinal: contextlib.nullcontext(),
        Stream=Stream,
        runtime=types.SimpleNamespace(
            deviceGetDefaultMemPool=lambda ordinal: 0, memPoolSetAttribute=lambda *a: None
        ),
    )
    cupy.get_default_memory_pool = lambda: types.SimpleNamespace(set_limit=lambda size: None)
    cupy.RawModule = RawModule
    cupy.empty = lambda shape, dtype: DeviceArray(memory, np.full(shape, 77, dtype))
    cupy.asarray = lambda array: DeviceArray(memory, np.asarray(array))
    return cupy


def stand_in_nvimgcodec(memory: Memory, failing: set[bytes], calls: list) -> types.ModuleType:
    """Decodes a sub code stream's region with libjpeg-turbo into padded rows; None for the
    payloads in ``failing`` (what nvImageCodec returns for an image it cannot decode). Each
    decode call appends its regions' (height, width) to ``calls``."""
    codec = types.ModuleType("nvidia.nvimgcodec")

    class Decoded:
        def __init__(self, pixels: np.ndarray):
            height, width, _ = pixels.shape
            padded = np.zeros((height, width * 3 + PITCH_PADDING), np.uint8)
            padded[:, : width * 3] = pixels.reshape(height, -1)
            self.__cuda_array_interface__ = {
                "shape": (height, width, 3),
                "strides": (padded.shape[1], 3, 1),
                "data": (memory.put(padded), False),
            }

    class CodeStream:
        def __init__(self, payload):
            self.payload, self.region = bytes(payload), None

        def get_sub_code_stream(self, region):
            self.region = region
            return self

    class Decoder:
        def __init__(self, device_id):
            pass

        def decode(self, streams, params, cuda_stream):
            calls.append([(s.region[2] - s.region[0], s.region[3] - s.region[1]) for s in streams])
            out = []
            for s in streams:
                top, left, bottom, right = s.region
                box = (top, left, bottom - top, right - left)
                image = (
                    None if s.payload in failing else Decoded(crop(decode_image(s.payload, 3), box))
                )
                out.append(image)
            return out

    codec.DecodeParams = lambda **kwargs: kwargs
    codec.Region = lambda *bounds: bounds
    codec.CodeStream = CodeStream
    codec.Decoder = Decoder
    return codec


@pytest.fixture(scope="module")
def odd_plans(odd_photo_dir):
    """A training plan batch of the odd photo set: CMYK and PNG rows decoded on the host, a
    grayscale JPEG, a large JPEG whose crop is box-averaged, flips."""
    kw = {"train": True, "batch_size": 12, "image_size": 32, "num_epochs": 1}
    return next(
        data.make_loader("imagenet2012", **kw, data_dir=odd_photo_dir, decoder=data.GpuDecoder())
    )


def _stand_in_decoder(monkeypatch, failing=frozenset(), calls=None):
    memory, launches = Memory(), []
    nvidia = types.ModuleType("nvidia")
    nvidia.nvimgcodec = stand_in_nvimgcodec(memory, set(failing), [] if calls is None else calls)
    monkeypatch.setitem(sys.modules, "cupy", stand_in_cupy(memory, launches))
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", nvidia.nvimgcodec)
    device = jax.local_devices()[0]
    monkeypatch.setattr(
        gpu_decode, "jnp", types.SimpleNamespace(from_dlpack=lambda a, device: a.array)
    )
    return gpu_decode.GpuJpegDecoder(32, device), launches


def test_the_decoders_rows_are_its_host_references(monkeypatch, odd_plans):
    layout = gpu_decode.crop_layout(odd_plans, 32)
    assert len(odd_plans["pixel_rows"]) and (layout.factors > 1).any() and odd_plans["flip"].any()
    # Groups of a few crops (the large one alone): several kernel launches per batch.
    sizes = [int(np.prod(odd_plans["box"][b, 2:])) * 3 for b in layout.jpeg_rows]
    monkeypatch.setattr(gpu_decode, "DECODE_GROUP_BYTES", 3 * int(np.median(sizes)))
    decoder, launches = _stand_in_decoder(monkeypatch)
    gpu_decode.DECODER_MEMORY.reset()
    images = decoder(odd_plans)["image"]
    expected = np.asarray(data.CpuReferenceDecoder(32)(odd_plans)["image"])
    np.testing.assert_array_equal(images, expected)
    assert len(launches) > 2 and sum(launches) == len(odd_plans["label"])
    memory = gpu_decode.DECODER_MEMORY
    assert memory.peak_bytes()
    memory.reset()  # The peak becomes what is held now: nothing, once a batch is done.
    assert not any(memory.peak_bytes().values())


def test_a_jpeg_the_codec_cannot_decode_is_decoded_on_the_host(monkeypatch, odd_plans):
    layout = gpu_decode.crop_layout(odd_plans, 32)
    offsets, jpeg = odd_plans["offsets"], odd_plans["jpeg"]
    failing = {jpeg[offsets[b] : offsets[b + 1]].tobytes() for b in layout.jpeg_rows[:3]}
    decoder, _ = _stand_in_decoder(monkeypatch, failing)
    images = decoder(odd_plans)["image"]
    np.testing.assert_array_equal(
        images, np.asarray(data.CpuReferenceDecoder(32)(odd_plans)["image"])
    )
