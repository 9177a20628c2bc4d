"""Tests of flax_attention.data: embedded dataset, preprocessing, grain pipeline, synthetic source.

All data is written into pytest temporary directories; nothing is downloaded.
"""

import importlib.util
import io
import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import data
from flax_attention.data import embedded, preprocess, sources

# Only the synthetic source works without these (e.g. where grain has no wheel).
needs_data_deps = pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("grain", "tensorflow_datasets", "sklearn", "PIL")
    ),
    reason="needs grain, tensorflow-datasets, scikit-learn and Pillow",
)


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


def _arrays(source) -> tuple[np.ndarray, np.ndarray]:
    records = [source[i] for i in range(len(source))]
    return np.stack([r["image"] for r in records]), np.array([r["label"] for r in records])


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@needs_data_deps
class TestEmbeddedDigits:
    def test_digits_read_back_through_tfds_data_source(self, tfds, data_dir):
        expected = embedded.digits_arrays()
        for split, count in (("train", 1437), ("test", 360)):
            source = tfds.data_source(embedded.NAME, split=split, data_dir=data_dir)
            assert len(source) == count
            images, labels = _arrays(source)
            assert images.shape == (count, 8, 8, 1)
            assert images.dtype == np.uint8
            assert images.max() == 255
            assert set(labels.tolist()) == set(range(10))
            np.testing.assert_array_equal(images, expected[split][0])
            np.testing.assert_array_equal(labels, expected[split][1])
        test_counts = np.bincount(expected["test"][1])
        assert test_counts.min() >= 34 and test_counts.max() <= 37  # Stratified: ~36 per class.

    def test_digits_split_is_deterministic(self, tfds, data_dir, tmp_path):
        data.build_digits(tmp_path)
        for split in ("train", "test"):
            first = _arrays(tfds.data_source(embedded.NAME, split=split, data_dir=data_dir))
            second = _arrays(tfds.data_source(embedded.NAME, split=split, data_dir=tmp_path))
            np.testing.assert_array_equal(first[0], second[0])
            np.testing.assert_array_equal(first[1], second[1])

    def test_data_source_builds_digits_on_first_use(self, tmp_path):
        assert not sources.is_prepared(embedded.NAME, tmp_path)
        assert len(data.data_source("digits", "test", tmp_path)) == 360
        assert sources.is_prepared(embedded.NAME, tmp_path)
        assert not list((tmp_path / embedded.NAME).glob("incomplete*"))

    def test_half_written_build_is_not_taken_as_prepared(self, tmp_path):
        # tfds writes into incomplete.* and renames when done; a leftover one is ignored and rebuilt.
        leftover = tmp_path / embedded.NAME / "incomplete.ABC123_1.0.0"
        leftover.mkdir(parents=True)
        (leftover / "dataset_info.json").write_text("{}")
        (leftover / f"{embedded.NAME}-train.array_record-00000-of-00001").write_bytes(b"partial")
        assert not sources.is_prepared(embedded.NAME, tmp_path)
        assert len(data.data_source("digits", "train", tmp_path)) == 1437

    def test_build_is_a_no_op_when_prepared(self, data_dir):
        files = sorted((data_dir / embedded.NAME).rglob("*"))
        mtimes = [f.stat().st_mtime_ns for f in files]
        data.build_digits(data_dir)
        assert sorted((data_dir / embedded.NAME).rglob("*")) == files
        assert [f.stat().st_mtime_ns for f in files] == mtimes


def _image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


@needs_data_deps
class TestPreprocess:
    @pytest.mark.parametrize(
        ("transform", "image_shape", "size"),
        [
            (preprocess.imagenet_train, (300, 200, 3), 224),
            (preprocess.imagenet_train, (40, 90, 3), 32),
            (preprocess.cifar_train, (32, 32, 3), 32),
            (preprocess.cifar_train, (32, 32, 3), 64),
            (preprocess.digits_train, (8, 8, 1), 16),
            (preprocess.digits_train, (8, 8, 1), 32),
        ],
    )
    def test_train_transforms_shape_and_determinism(self, transform, image_shape, size):
        image = _image(*image_shape)
        out = transform(image, size, np.random.default_rng(7))
        assert out.shape == (size, size, image_shape[2])
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, transform(image, size, np.random.default_rng(7)))
        others = [transform(image, size, np.random.default_rng(seed)) for seed in range(8)]
        assert any(not np.array_equal(out, other) for other in others)

    @pytest.mark.parametrize(
        ("transform", "image_shape", "size"),
        [
            (preprocess.imagenet_eval, (300, 200, 3), 224),
            (preprocess.imagenet_eval, (200, 300, 3), 224),
            (preprocess.resize_square, (32, 32, 3), 32),
            (preprocess.resize_square, (8, 8, 1), 16),
        ],
    )
    def test_eval_transforms_shape(self, transform, image_shape, size):
        out = transform(_image(*image_shape), size)
        assert out.shape == (size, size, image_shape[2])
        assert out.dtype == np.uint8

    def test_center_crop_keeps_the_center(self):
        # A centred bright square of 7/8 of the side stays fully inside the crop.
        image = np.zeros((256, 256, 1), np.uint8)
        image[16:240, 16:240] = 255
        out = preprocess.center_crop(image, 224)
        assert out.shape == (224, 224, 1)
        assert out[2:-2, 2:-2].min() == 255

    def test_random_resized_crop_full_scale_is_the_whole_image(self):
        box = preprocess.random_resized_crop_box(
            64, 48, np.random.default_rng(0), scale=(1, 1), ratio=(0.75, 0.75)
        )
        assert box == (0, 0, 64, 48)

    def test_random_resized_crop_boxes_fit_and_cover_scale(self):
        rng = np.random.default_rng(0)
        for _ in range(200):
            top, left, h, w = preprocess.random_resized_crop_box(375, 500, rng)
            assert top >= 0 and top + h <= 375 and left >= 0 and left + w <= 500
            assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0

    def test_pad_random_crop_is_a_shift(self):
        image = _image(16, 16, 1)
        out = preprocess.pad_random_crop(image, 2, np.random.default_rng(3))
        assert out.shape == image.shape
        shifts = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(
                out[max(dy, 0) : 16 + min(dy, 0), max(dx, 0) : 16 + min(dx, 0)],
                image[max(-dy, 0) : 16 + min(-dy, 0), max(-dx, 0) : 16 + min(-dx, 0)],
            )
        ]
        assert shifts

    def test_random_flip_mirrors_or_keeps(self):
        image = _image(4, 6)
        outs = [preprocess.random_flip(image, np.random.default_rng(s)) for s in range(16)]
        assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
        assert any(np.array_equal(o, image[:, ::-1]) for o in outs)

    def test_preprocess_callables_give_uint8(self):
        record = {"image": np.full((8, 8, 1), 255, np.uint8), "label": np.int64(3)}
        train = preprocess.TrainPreprocess(preprocess.digits_train, 16, 1)
        evaluate = preprocess.EvalPreprocess(preprocess.resize_square, 16, 1)
        for out in (train(record, np.random.default_rng(0)), evaluate(record)):
            assert out["image"].shape == (16, 16, 1)
            assert out["image"].dtype == np.uint8
            assert out["label"].dtype == np.int32 and out["label"] == 3
        np.testing.assert_array_equal(evaluate(record)["image"], 255)


@needs_data_deps
class TestPipeline:
    def test_train_batches_are_nhwc_uint8_and_reproducible(self, data_dir):
        kwargs = {"train": True, "batch_size": 32, "data_dir": data_dir, "seed": 1}
        first = _take(data.make_loader("digits", **kwargs), 3)
        for batch in first:
            assert batch["image"].shape == (32, 16, 16, 1)
            assert batch["image"].dtype == np.uint8
            assert batch["label"].shape == (32,)
            assert batch["label"].dtype == np.int32
            assert batch["label"].min() >= 0 and batch["label"].max() < 10
        _assert_same_batches(first, _take(data.make_loader("digits", **kwargs), 3))
        other_seed = _take(data.make_loader("digits", **{**kwargs, "seed": 2}), 1)
        assert not np.array_equal(first[0]["label"], other_seed[0]["label"])

    def test_train_reshuffles_every_epoch(self, data_dir):
        ds = data.make_dataset(
            "digits", train=True, batch_size=360, split="test", data_dir=data_dir
        )
        labels = np.asarray(embedded.digits_arrays()["test"][1])
        epoch0, epoch1 = ds[0]["label"], ds[1]["label"]
        np.testing.assert_array_equal(np.sort(epoch0), np.sort(labels))
        np.testing.assert_array_equal(np.sort(epoch1), np.sort(labels))
        assert not np.array_equal(epoch0, epoch1)
        assert not np.array_equal(epoch0, labels)

    def test_eval_covers_split_once_in_order(self, data_dir):
        ds = data.make_dataset("digits", train=False, batch_size=100, data_dir=data_dir)
        batches = list(ds)
        assert [len(b["label"]) for b in batches] == [100, 100, 100, 60]
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_array_equal(labels, embedded.digits_arrays()["test"][1])
        _assert_same_batches(batches, list(ds))

    def test_image_size_override(self, data_dir):
        ds = data.make_dataset(
            "digits", train=False, batch_size=4, image_size=32, data_dir=data_dir
        )
        assert ds[0]["image"].shape == (4, 32, 32, 1)

    def test_shards_are_disjoint_and_cover_the_split(self, data_dir):
        def images(shard_index=0, shard_count=1):
            ds = data.make_dataset(
                "digits",
                train=False,
                batch_size=1000,
                data_dir=data_dir,
                shard_index=shard_index,
                shard_count=shard_count,
            )
            return ds[0]["image"]

        full, shard0, shard1 = images(), images(0, 2), images(1, 2)
        assert len(shard0) + len(shard1) == len(full) == 360
        np.testing.assert_array_equal(shard0, full[0::2])
        np.testing.assert_array_equal(shard1, full[1::2])
        with pytest.raises(ValueError, match="shard_index"):
            images(2, 2)

    def test_training_shards_together_hold_the_one_process_batches(self, data_dir):
        """Past an epoch boundary, global batch i of two processes (batch 8 each) is a
        one-process run's batch i (batch 16) row for row: process p holds rows 8p..8p+7."""

        def batches(shard_index=0, shard_count=1, batch_size=16):
            ds = data.make_dataset(
                "digits",
                train=True,
                batch_size=batch_size,
                data_dir=data_dir,
                shard_index=shard_index,
                shard_count=shard_count,
            )
            return [ds[i] for i in (0, 89, 90)]  # 1437 // 16 = 89 batches an epoch

        full, shard0, shard1 = batches(), batches(0, 2, 8), batches(1, 2, 8)
        for one, first, second in zip(full, shard0, shard1, strict=True):
            for key in ("image", "label"):
                np.testing.assert_array_equal(first[key], one[key][:8])
                np.testing.assert_array_equal(second[key], one[key][8:])

    def test_default_shard_is_this_process(self, data_dir):
        full = data.make_dataset("digits", train=False, batch_size=1000, data_dir=data_dir)
        assert len(full[0]["label"]) == 360  # A single process reads everything.

    def test_iterator_state_restores_identical_batches(self, data_dir):
        kwargs = {"train": True, "batch_size": 64, "data_dir": data_dir}
        iterator = data.make_loader("digits", **kwargs)
        _take(iterator, 25)  # Past the first epoch (1437 // 64 = 22 batches).
        state = json.loads(json.dumps(iterator.get_state()))
        expected = _take(iterator, 4)

        restored = data.make_loader("digits", **kwargs)
        restored.set_state(state)
        _assert_same_batches(expected, _take(restored, 4))

    def test_worker_processes_give_the_same_batches_and_restore(self, data_dir):
        kwargs = {"train": True, "batch_size": 64, "data_dir": data_dir}
        in_process = _take(data.make_loader("digits", **kwargs), 6)
        workers = data.make_loader("digits", **kwargs, num_workers=2)
        _assert_same_batches(in_process[:3], _take(workers, 3))
        state = json.loads(json.dumps(workers.get_state()))
        workers.close()

        restored = data.make_loader("digits", **kwargs, num_workers=2)
        restored.set_state(state)
        _assert_same_batches(in_process[3:], _take(restored, 3))
        restored.close()


def _fake_cifar10(tfds, data_dir, num_train=20, num_test=10):
    """A tiny array_record 'cifar10' with tfds' real feature layout (PNG-encoded images)."""
    from PIL import Image

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        buffer.seek(0)
        return buffer  # A file object: tfds stores the bytes without TensorFlow.

    class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar10"
        VERSION = tfds.core.Version("3.0.2")
        code_path = None

        def _info(self):
            features = {
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(num_train),
                "test": self._generate_examples(num_test),
            }

        def _generate_examples(self, count):
            rng = np.random.default_rng(count)
            for i in range(count):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                yield i, {"id": f"id{i}", "image": png(image), "label": i % 10}

    builder = Cifar10(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


@needs_data_deps
class TestRegisteredDatasets:
    @pytest.mark.parametrize(
        ("name", "hint"),
        [
            ("cifar10", "tfds build cifar10"),
            ("cifar100", "tfds build cifar100"),
            ("imagenet2012", "manual"),
        ],
    )
    def test_missing_dataset_error_names_the_directory(self, tmp_path, name, hint):
        with pytest.raises(data.DatasetNotFoundError) as info:
            data.make_loader(name, train=True, batch_size=8, data_dir=tmp_path)
        assert isinstance(info.value, FileNotFoundError)
        message = str(info.value)
        assert str(tmp_path) in message
        assert hint in message
        assert "--file_format array_record" in message
        assert not (tmp_path / name).exists()  # Nothing was downloaded or half-prepared.

    def test_unknown_dataset_lists_known_names(self):
        with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; known: .*cifar10"):
            data.get_spec("mnist")

    def test_cifar10_from_local_data_dir(self, tfds, tmp_path):
        _fake_cifar10(tfds, tmp_path)
        spec = data.get_spec("cifar10")
        train = _take(data.make_loader("cifar10", train=True, batch_size=8, data_dir=tmp_path), 3)
        assert train[0]["image"].shape == (8, 32, 32, 3)
        assert train[0]["image"].dtype == np.uint8
        batches = list(data.make_dataset("cifar10", train=False, batch_size=8, data_dir=tmp_path))
        assert [b["image"].shape[0] for b in batches] == [8, 2]
        source = data.data_source("cifar10", "test", tmp_path)
        from PIL import Image

        stored = np.asarray(Image.open(io.BytesIO(source[0]["image"])))  # The PNG, decoded.
        np.testing.assert_array_equal(batches[0]["image"][0], stored)
        # What the float32 host pipeline gave before is what the step now computes on device.
        before = (stored.astype(np.float32) / 255 - spec.mean) / spec.std
        on_device = data.normalize_images(jnp.asarray(stored), spec.mean, spec.std)
        np.testing.assert_allclose(on_device, before, rtol=1e-6, atol=1e-6)


# Synthetic source.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_synthetic_batches(dtype):
    batches = data.synthetic_batches(8, 24, 5, seed=3, dtype=dtype)
    batch = next(batches)
    assert batch["image"].shape == (8, 24, 24, 3)
    assert batch["image"].dtype == dtype
    assert batch["label"].shape == (8,)
    assert batch["label"].dtype == jnp.int32
    assert float(jnp.abs(batch["image"].astype(jnp.float32)).mean()) > 0.5
    assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) < 5
    assert next(batches) is batch
    again = next(data.synthetic_batches(8, 24, 5, seed=3, dtype=dtype))
    np.testing.assert_array_equal(np.asarray(again["image"]), np.asarray(batch["image"]))


def test_synthetic_needs_no_grain_or_tfds():
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"grain", "tensorflow_datasets", "sklearn", "PIL"}:
                    raise ImportError(f"blocked: {name}")

        sys.meta_path.insert(0, Block())
        from flax_attention.data import synthetic_batches

        batch = next(synthetic_batches(2, 8, 10, seed=0, dtype="float32", channels=1))
        assert batch["image"].shape == (2, 8, 8, 1)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
