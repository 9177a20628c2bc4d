"""GPU decoding self-check, one command before a timed input-suite run on a GPU machine:

    python -m benchmarks.lab.gpu_decode_check

Writes the input suite's photo dataset (with its CMYK, grayscale, PNG-named-JPEG and 4200 px
images), decodes training batches (random crops) and evaluation batches (centre crops) with
the GPU decoder on every local GPU and with the CPU decoder, and prints per check the mean,
99th percentile and max absolute pixel difference against the CPU decoder and against the GPU
decoder's host reference (``CpuReferenceDecoder``: the same arithmetic, libjpeg-turbo
instead of nvJPEG), the rows each GPU decoded, and the decoders' peak GPU memory per device.
Exit status 1 when a difference is past the documented tolerance (docs/input.md) or a device's
rows did not stay on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_attention import data
from flax_attention.data import photos
from flax_attention.data.gpu_decode import DECODER_MEMORY

DATASET = "imagenet2012"
TRAIN_TOLERANCE = (2.0, 12)  # mean, 99th percentile of |GPU - CPU decoder|, uint8 levels
EVAL_TOLERANCE = (3.5, 16)
REFERENCE_TOLERANCE = 1.0  # mean |GPU - host reference|: only the JPEG decoders differ


def _differences(images: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    diff = np.abs(np.asarray(images).astype(int) - expected)
    return {
        "mean": round(float(diff.mean()), 3),
        "p99": float(np.percentile(diff, 99)),
        "max": int(diff.max()),
    }


def check(data_dir: Path, size: int, batch: int) -> bool:
    """Prints the comparisons; whether all are within tolerance."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    rows = batch * len(devices)
    common = {"batch_size": rows, "image_size": size, "data_dir": data_dir}
    gpu = data.GpuDecoder()
    decode = data.PerDeviceDecoder(data.GpuJpegDecoder, size, sharding)
    reference = data.CpuReferenceDecoder(size)
    good = True
    for kind, tolerance in (("train", TRAIN_TOLERANCE), ("eval", EVAL_TOLERANCE)):
        train = kind == "train"
        cpu = data.make_dataset(DATASET, train=train, **common)[0]
        plans = data.make_dataset(DATASET, train=train, **common, decoder=gpu)[0]
        if not train:
            like = {"image": cpu["image"][:0], "label": cpu["label"][:0]}
            plans = data.pad_plans(plans, rows, like)
        DECODER_MEMORY.reset()
        out = decode(plans)["image"]
        for shard in out.addressable_shards:
            good &= shard.data.devices() == {shard.device}
        images = np.asarray(out)[: len(cpu["label"])]
        vs_cpu = _differences(images, cpu["image"])
        vs_reference = _differences(images, np.asarray(reference(plans)["image"])[: len(images)])
        host_rows = len(plans["pixel_rows"])
        print(
            f"{kind}: {len(images)} images on {len(devices)} GPU(s), {host_rows} host-decoded; "
            f"vs CPU decoder {vs_cpu}; vs host reference {vs_reference}; decoder peak MiB "
            f"{ {d: round(b / 2**20, 1) for d, b in DECODER_MEMORY.peak_bytes().items()} }"
        )
        good &= vs_cpu["mean"] < tolerance[0] and vs_cpu["p99"] <= tolerance[1]
        good &= vs_reference["mean"] < REFERENCE_TOLERANCE
    return good


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab.gpu_decode_check")
    parser.add_argument("--size", type=int, default=224, help="output side (default 224)")
    parser.add_argument("--batch", type=int, default=64, help="rows per GPU (default 64)")
    parser.add_argument("--images", type=int, default=256, help="training images to write")
    args = parser.parse_args(argv)
    data.prepare_decoding("gpu", DATASET)
    if not data.gpu_decoding_available():
        print("error: no CUDA GPU with nvImageCodec and CuPy here", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        photos.write_photo_dataset(
            scratch,
            num_train=args.images,
            num_eval=args.batch * jax.local_device_count(),
            odd_images=True,
        )
        good = check(Path(scratch), args.size, args.batch)
    print("ok" if good else "FAILED: past the tolerance or rows off their device")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
