"""Input data: tfds array_record datasets read through grain, plus a synthetic source.

grain, tensorflow-datasets, scikit-learn and Pillow are imported only by the functions that read
or build real data, so ``synthetic_batches`` works without them. TensorFlow is never needed.
"""

from flax_attention.data.decoders import (
    DECODERS,
    CpuDecoder,
    Decoder,
    GpuDecoder,
    HybridDecoder,
    choose_decoder,
    prepare_decoding,
)
from flax_attention.data.device import normalize_images, prefetch_to_device
from flax_attention.data.embedded import build_digits
from flax_attention.data.gpu_decode import (
    CpuReferenceDecoder,
    GpuJpegDecoder,
    gpu_decoding_available,
    reserve_gpu_memory,
    share_gpu_with_training,
)
from flax_attention.data.per_device import PerDeviceDecoder
from flax_attention.data.pipeline import make_dataset, make_loader
from flax_attention.data.plans import pad_plans
from flax_attention.data.preprocess import EvalPreprocess, TrainPreprocess
from flax_attention.data.registry import DATASETS, DatasetSpec, get_spec
from flax_attention.data.sources import DatasetNotFoundError, data_source, default_data_dir
from flax_attention.data.synthetic import synthetic_batches

__all__ = [
    "DATASETS",
    "DECODERS",
    "CpuDecoder",
    "CpuReferenceDecoder",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Decoder",
    "EvalPreprocess",
    "GpuDecoder",
    "GpuJpegDecoder",
    "HybridDecoder",
    "PerDeviceDecoder",
    "TrainPreprocess",
    "build_digits",
    "choose_decoder",
    "data_source",
    "default_data_dir",
    "get_spec",
    "gpu_decoding_available",
    "make_dataset",
    "make_loader",
    "normalize_images",
    "pad_plans",
    "prefetch_to_device",
    "prepare_decoding",
    "reserve_gpu_memory",
    "share_gpu_with_training",
    "synthetic_batches",
]
