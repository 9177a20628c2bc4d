"""Each local device decodes the rows of the batch it holds.

A process's batch of b rows is split over its devices by the batch's sharding: device d holds
a contiguous block of those rows (``device_rows``). ``PerDeviceDecoder`` hands each device's
block of a plan batch (``plans.slice_plans``) to that device's decoder, all devices at once on
threads of their own, and assembles the global array from the per-device arrays
(``jax.make_array_from_single_device_arrays``): no row crosses devices, nothing is resharded.
The same code serves one process with several GPUs and one process per GPU or per host.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from flax_attention.data.plans import PLAN_KEYS, slice_plans

PlanDecoder = Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]
# (output side, device) -> that device's plan decoder.
DeviceDecoderFactory = Callable[[int, jax.Device], PlanDecoder]


def device_rows(sharding: Sharding, local_rows: int) -> list[tuple[jax.Device, int, int]]:
    """(device, start, stop) for each of this process's devices of ``sharding``: the rows
    [start, stop) of the process's batch of ``local_rows`` rows that the device holds, in row
    order. The batch's global rows are ``local_rows`` times the number of processes that share
    it; a ``ValueError`` when the rows do not split evenly over the devices."""
    devices = sharding.addressable_devices
    processes = len(sharding.device_set) // len(devices)
    global_rows = local_rows * processes
    if global_rows % len(sharding.device_set):
        raise ValueError(
            f"{global_rows} rows do not split evenly over {len(sharding.device_set)} devices"
        )
    indices = sharding.addressable_devices_indices_map((global_rows,))
    spans = {d: indices[d][0].indices(global_rows)[:2] for d in devices}
    offset = min(start for start, _ in spans.values())
    return sorted(
        ((d, start - offset, stop - offset) for d, (start, stop) in spans.items()),
        key=lambda item: (item[1], item[0].id),
    )


class PerDeviceDecoder:
    """Plan batch of a process (b rows, ``plans.collate_plans``, maybe with a "mask") ->
    {"image": uint8 (global rows, size, size, C) jax.Array with ``sharding``, the batch's other
    keys ("label", "mask") as host arrays}: device d's rows decoded by ``make_decoder(size,
    d)``, on d. ``sharding`` None: the first local device alone. ``threads``: batches decoded
    at once (prefetch threads) per device. Thread-safe when the decoders are."""

    def __init__(
        self,
        make_decoder: DeviceDecoderFactory,
        size: int,
        sharding: Sharding | None = None,
        threads: int = 1,
    ):
        self.sharding = sharding or SingleDeviceSharding(jax.local_devices()[0])
        self.size = size
        self.decoders = {d: make_decoder(size, d) for d in self.sharding.addressable_devices}
        self._pools = {
            d: ThreadPoolExecutor(threads, thread_name_prefix=f"decode_{d.id}")
            for d in self.decoders
        }

    def _decode_rows(self, device: jax.Device, batch: dict, start: int, stop: int) -> jax.Array:
        image = self.decoders[device](slice_plans(batch, start, stop))["image"]
        if image.devices() != {device}:
            raise RuntimeError(f"the decoder of {device} returned an array on {image.devices()}")
        return image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        local_rows = len(batch["label"])
        blocks = device_rows(self.sharding, local_rows)
        if len(blocks) == 1:
            device, start, stop = blocks[0]
            pieces = [self._decode_rows(device, batch, start, stop)]
        else:
            futures = [
                self._pools[d].submit(self._decode_rows, d, batch, start, stop)
                for d, start, stop in blocks
            ]
            pieces = [future.result() for future in futures]
        global_rows = local_rows * len(self.sharding.device_set) // len(self.decoders)
        images = jax.make_array_from_single_device_arrays(
            (global_rows, *pieces[0].shape[1:]), self.sharding, pieces
        )
        return {"image": images} | {k: v for k, v in batch.items() if k not in PLAN_KEYS}
