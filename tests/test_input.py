"""The ImageNet input path: JPEG decoding, OpenCV resampling against Pillow's, the photo-like
JPEG dataset through the grain pipeline (deterministic, resumable), device prefetch."""

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flax_attention import data
from flax_attention.data import decode, decoders, photos, preprocess


def _photo_jpeg(seed: int, height: int = 120, width: int = 160) -> tuple[np.ndarray, bytes]:
    image = photos.photo(np.random.default_rng(seed), height, width)
    return image, photos.encode_jpeg(image)


def _pil_decode(payload: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)).convert(mode))


class TestDecode:
    def test_jpeg_decodes_as_pillow_does(self):
        _, payload = _photo_jpeg(0)
        np.testing.assert_array_equal(decode.decode_image(payload, 3), _pil_decode(payload))
        import simplejpeg

        gray_payload = simplejpeg.encode_jpeg(
            np.ascontiguousarray(_photo_jpeg(1)[0][..., :1]), colorspace="GRAY"
        )
        gray = decode.decode_image(gray_payload, 1)
        assert gray.shape == (120, 160, 1)
        np.testing.assert_array_equal(gray[..., 0], _pil_decode(gray_payload, "L"))

    def test_png_decodes_as_pillow_does(self):
        image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        np.testing.assert_array_equal(decode.decode_image(buffer.getvalue(), 3), image)

    def test_size_from_the_jpeg_header(self):
        _, payload = _photo_jpeg(2, 77, 91)
        assert decode.image_size(payload) == (77, 91)

    def test_undecodable_bytes_are_refused(self):
        with pytest.raises(ValueError, match="cannot decode"):
            decode.decode_image(b"not an image at all", 3)


def _pil_resized_crop(image: np.ndarray, box: preprocess.Box, size: int) -> np.ndarray:
    """What the pipeline computed before: Pillow's antialiased bilinear on the crop box."""
    top, left, h, w = box
    pil = Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    return np.asarray(pil)


def test_resampling_stays_close_to_pillows_antialiased_bilinear():
    """The documented difference from the Pillow path on random-resized crops of photos:
    mean under one uint8 level, 99th percentile <= 3, max <= 16."""
    rng = np.random.default_rng(0)
    diffs = []
    for seed in range(6):
        image = photos.photo(np.random.default_rng(seed), 300, 400)
        for _ in range(4):
            box = preprocess.random_resized_crop_box(300, 400, rng)
            ours = preprocess.resize(preprocess.crop(image, box), 112, 112)
            diffs.append(np.abs(ours.astype(int) - _pil_resized_crop(image, box, 112)))
    diffs = np.concatenate([d.ravel() for d in diffs])
    assert diffs.mean() < 1.0
    assert np.percentile(diffs, 99) <= 3
    assert diffs.max() <= 16


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos")
    photos.write_photo_dataset(
        path, num_train=24, num_eval=6, heights=(60, 90), widths=(70, 100), seed=0
    )
    return path


class TestPhotoDataset:
    def test_records_are_jpeg_bytes_of_the_stated_sizes(self, photo_dir):
        source = data.data_source("imagenet2012", "train", photo_dir)
        assert len(source) == 24
        record = source[5]
        assert decode.is_jpeg(record["image"])
        height, width = decode.image_size(record["image"])
        assert 60 <= height <= 90 and 70 <= width <= 100
        assert 0 <= record["label"] < 24  # Labels cycle over the classes in writing order.

    def test_train_batches_are_deterministic_and_resume_exactly(self, photo_dir):
        kwargs = {"train": True, "batch_size": 4, "data_dir": photo_dir, "image_size": 32}
        loader = data.make_loader("imagenet2012", **kwargs, seed=3)
        first = [next(loader) for _ in range(8)]  # Past the first epoch (6 batches).
        assert first[0]["image"].shape == (4, 32, 32, 3)
        assert first[0]["image"].dtype == np.uint8
        again = data.make_loader("imagenet2012", **kwargs, seed=3)
        for a, b in zip(first, [next(again) for _ in range(8)], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
        state = json.loads(json.dumps(again.get_state()))
        expected = [next(again) for _ in range(3)]
        resumed = data.make_loader("imagenet2012", **kwargs, seed=3)
        resumed.set_state(state)
        for a, b in zip(expected, [next(resumed) for _ in range(3)], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])

    def test_eval_is_the_center_crop_of_the_decoded_image(self, photo_dir):
        batch = data.make_dataset(
            "imagenet2012", train=False, batch_size=6, data_dir=photo_dir, image_size=32
        )[0]
        source = data.data_source("imagenet2012", "validation", photo_dir)
        expected = preprocess.imagenet_eval(_pil_decode(source[2]["image"]), 32)
        np.testing.assert_array_equal(batch["image"][2], expected)


class TestDevice:
    def test_normalisation_is_the_host_formula(self):
        images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        expected = (images.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
        got = jax.jit(lambda x: data.normalize_images(x, mean, std))(images)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        assert data.normalize_images(jnp.asarray(images), None, None).dtype == jnp.float32
        floats = jnp.ones((1, 2, 2, 3))
        assert data.normalize_images(floats, mean, std) is floats

    def test_prefetch_keeps_order_and_tags_and_runs_ahead(self):
        import threading

        put_threads = []
        two_prepared = threading.Event()

        def put(batch):
            put_threads.append(threading.current_thread())
            if len(put_threads) == 2:
                two_prepared.set()
            return batch * 10

        stream = data.prefetch_to_device(((i, f"state{i}") for i in range(5)), put, size=2)
        assert next(stream) == (0, "state0")
        assert two_prepared.wait(5)  # The next batch is prepared while the caller works.
        assert list(stream) == [(10, "state1"), (20, "state2"), (30, "state3"), (40, "state4")]
        assert threading.current_thread() not in put_threads

    def test_prefetch_raises_the_producers_error_after_the_good_batches(self):
        def batches():
            yield 1, "a"
            raise RuntimeError("disk gone")

        stream = data.prefetch_to_device(batches(), lambda b: b)
        assert next(stream) == (1, "a")
        with pytest.raises(RuntimeError, match="disk gone"):
            next(stream)

    def test_prefetch_stops_its_thread_when_closed(self):
        import itertools
        import threading

        stream = data.prefetch_to_device(((i, i) for i in itertools.count()), lambda b: b)
        next(stream)
        stream.close()
        assert not any(t.name == "prefetch_to_device" for t in threading.enumerate())

    def test_prefetch_threads_prepare_batches_at_once_and_keep_their_order(self):
        import threading
        import time

        all_started = threading.Barrier(3, timeout=5)  # Three puts must run at the same time.

        def put(batch):
            if batch < 3:
                all_started.wait()
            time.sleep(0.01 * ((7 - batch) % 3))  # Later batches can finish first.
            return threading.current_thread().name, batch * 10

        stream = data.prefetch_to_device(((i, f"s{i}") for i in range(9)), put, threads=3)
        out = list(stream)
        assert [(value[1], tag) for value, tag in out] == [(i * 10, f"s{i}") for i in range(9)]
        assert len({value[0] for value, _ in out}) == 3
        assert not any(t.name.startswith("prefetch_put") for t in threading.enumerate())

    def test_prefetch_threads_raise_the_put_error_after_the_good_batches(self):
        def put(batch):
            if batch == 2:
                raise ValueError("corrupt JPEG")
            return batch

        stream = data.prefetch_to_device(((i, i) for i in range(6)), put, threads=2)
        assert [next(stream), next(stream)] == [(0, 0), (1, 1)]
        with pytest.raises(ValueError, match="corrupt JPEG"):
            next(stream)
        stream.close()

    def test_prefetch_threads_must_be_positive(self):
        with pytest.raises(ValueError, match="prefetch threads"):
            next(data.prefetch_to_device(iter([(1, None)]), lambda b: b, threads=0))

    def test_prefetch_size_must_be_positive(self):
        with pytest.raises(ValueError, match="prefetch size"):
            next(data.prefetch_to_device(iter([(1, None)]), lambda b: b, size=0))


class TestGpuDecodingHostSide:
    """What the GPU decoder path does on the host and in JAX, checked on any backend."""

    def test_resample_crop_is_pillows_antialiased_bilinear(self):
        from flax_attention.data.gpu_decode import resample_crop

        rng = np.random.default_rng(0)
        image = photos.photo(rng, 300, 400)
        for flip in (False, True, False, True):
            box = preprocess.random_resized_crop_box(300, 400, rng)
            out = resample_crop(preprocess.crop(image, box), 224, flip)
            assert out.shape == (224, 224, 3) and out.dtype == np.uint8
            expected = _pil_resized_crop(image, box, 224)
            expected = expected[:, ::-1] if flip else expected
            diff = np.abs(out.astype(int) - expected)
            # Pillow rounds to uint8 between its two passes and uses fixed-point weights.
            assert diff.mean() < 0.25 and diff.max() <= 6, (box, diff.mean(), diff.max())

    def test_resample_crop_copies_an_output_sized_row_exactly(self):
        from flax_attention.data.gpu_decode import resample_crop

        pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), np.uint8)
        np.testing.assert_array_equal(resample_crop(pixels, 24), pixels)
        np.testing.assert_array_equal(resample_crop(pixels, 24, flip=True), pixels[:, ::-1])

    def test_resample_taps_cover_every_weight_up_to_the_largest_reduced_crop(self):
        """Within ``MAX_SCALE``, the ``TAPS`` window holds every source sample the triangle
        filter weighs (the weights, computed densely, sum to 1 inside the window)."""
        from flax_attention.data.gpu_decode import MAX_SCALE, resample_taps

        size = 16
        for length in range(1, MAX_SCALE * size + 1):
            indices, weights = resample_taps(length, size)
            scale = length / size
            support = max(scale, 1.0)
            centre = (np.arange(size) + 0.5) * scale
            source = np.arange(length) + 0.5
            dense = np.maximum(0, 1 - np.abs(source[None] - centre[:, None]) / support)
            dense /= dense.sum(axis=1, keepdims=True)
            gathered = np.zeros_like(dense)
            np.add.at(gathered, (np.arange(size)[:, None], indices), weights)
            np.testing.assert_allclose(gathered, dense, atol=1e-6, err_msg=f"length {length}")

    def test_resample_crop_refuses_a_crop_past_the_reduced_side(self):
        from flax_attention.data.gpu_decode import resample_crop

        with pytest.raises(ValueError, match="box-average"):
            resample_crop(np.zeros((65, 10, 3), np.uint8), 32)

    def test_crop_plan_draws_what_the_cpu_path_draws(self):
        from flax_attention.data.plans import CropPlan

        _, payload = _photo_jpeg(3, 150, 200)
        for seed in range(10):
            plan = CropPlan(TRAIN_32)({"image": payload, "label": 7}, np.random.default_rng(seed))
            box = tuple(int(v) for v in plan["box"])
            cropped = preprocess.resize(
                preprocess.crop(decode.decode_image(payload, 3), box), 32, 32
            )
            expected = cropped[:, ::-1] if plan["flip"] else cropped
            cpu = preprocess.imagenet_train(
                decode.decode_image(payload, 3), 32, np.random.default_rng(seed)
            )
            np.testing.assert_array_equal(cpu, expected)
            assert plan["jpeg"].tobytes() == payload and plan["label"] == 7

    def test_a_jpeg_past_gpu_max_pixels_is_decoded_on_the_host(self, monkeypatch):
        from flax_attention.data import plans

        _, payload = _photo_jpeg(3, 150, 200)
        record = {"image": payload, "label": 7}
        train = plans.CropPlan(TRAIN_32)
        evaluate = plans.CenterCropPlan(preprocess.EvalPreprocess(preprocess.imagenet_eval, 32, 3))
        monkeypatch.setattr(plans, "GPU_MAX_PIXELS", 150 * 200)
        assert "jpeg" in train(record, np.random.default_rng(0)) and "jpeg" in evaluate(record)
        monkeypatch.setattr(plans, "GPU_MAX_PIXELS", 150 * 200 - 1)
        image = decode.decode_image(payload, 3)
        row = train(record, np.random.default_rng(0))
        expected = preprocess.imagenet_train(image, 32, np.random.default_rng(0))
        np.testing.assert_array_equal(row["image"], expected)
        np.testing.assert_array_equal(
            evaluate(record)["image"], preprocess.imagenet_eval(image, 32)
        )

    def test_gpu_plan_batches_are_deterministic_and_resume_exactly(self, photo_dir):
        kwargs = {"train": True, "batch_size": 4, "data_dir": photo_dir}
        kwargs["decoder"] = data.GpuDecoder()
        loader = data.make_loader("imagenet2012", **kwargs)
        batch = next(loader)
        assert set(batch) == {"jpeg", "offsets", "box", "flip", "label", "pixels", "pixel_rows"}
        assert len(batch["pixel_rows"]) == 0  # Every image a JPEG the GPU takes.
        assert batch["offsets"].shape == (5,) and batch["offsets"][-1] == len(batch["jpeg"])
        first = batch["jpeg"][: batch["offsets"][1]].tobytes()
        assert decode.is_jpeg(first)
        state = json.loads(json.dumps(loader.get_state()))
        expected = [next(loader) for _ in range(7)]
        resumed = data.make_loader("imagenet2012", **kwargs)
        resumed.set_state(state)
        for a, b in zip(expected, [next(resumed) for _ in range(7)], strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])

    def test_decoder_choice(self):
        assert data.choose_decoder("cpu", "imagenet2012") == data.CpuDecoder()
        gpu = data.gpu_decoding_available()
        expected_auto = data.GpuDecoder(threads=2) if gpu else data.CpuDecoder()
        assert data.choose_decoder("auto", "imagenet2012", threads=2) == expected_auto
        assert data.choose_decoder("auto", "digits") == data.CpuDecoder()
        with pytest.raises(ValueError, match="not stored as JPEG"):
            data.choose_decoder("gpu", "cifar10")
        with pytest.raises(ValueError, match="unknown decoder 'nvjpeg'"):
            data.choose_decoder("nvjpeg", "imagenet2012")

    def test_each_name_is_one_decoder_object_with_its_settings(self, monkeypatch):
        monkeypatch.setattr(decoders, "gpu_decoding_available", lambda: True)
        settings = {"threads": 2, "cpu_share": 0.25}
        chosen = {
            name: data.choose_decoder(name, "imagenet2012", **settings) for name in data.DECODERS
        }
        assert chosen == {
            "auto": data.GpuDecoder(threads=2),
            "cpu": data.CpuDecoder(),
            "gpu": data.GpuDecoder(threads=2),
            "hybrid": data.HybridDecoder(threads=2, cpu_share=0.25),
        }
        assert [chosen[name].threads for name in ("cpu", "gpu", "hybrid")] == [1, 2, 2]
        assert data.choose_decoder("auto", "digits", **settings) == data.CpuDecoder()

    def test_only_decoders_that_may_use_the_gpu_prepare_the_process_for_it(self, monkeypatch):
        for name, dataset, expected in [
            ("cpu", "imagenet2012", None),
            ("auto", "digits", None),
            ("auto", "imagenet2012", "32"),
            ("gpu", "imagenet2012", "32"),
            ("hybrid", "imagenet2012", "32"),
        ]:
            monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
            data.prepare_decoding(name, dataset)
            assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected, (name, dataset)
        with pytest.raises(ValueError, match="unknown decoder 'nvjpeg'"):
            data.prepare_decoding("nvjpeg", "imagenet2012")

    def test_only_hybrid_decoding_without_workers_has_a_note(self):
        assert data.HybridDecoder().notes(2) == []
        assert "--num-workers 0 decodes its CPU rows" in data.HybridDecoder().notes(0)[0]
        assert data.CpuDecoder().notes(0) == data.GpuDecoder().notes(0) == []

    @pytest.mark.skipif(data.gpu_decoding_available(), reason="this machine can decode on the GPU")
    def test_gpu_decoder_refused_without_a_gpu(self):
        for name in ("gpu", "hybrid"):
            with pytest.raises(
                ValueError, match=f"--decoder {name} cannot be used: it needs CUDA GPUs"
            ):
                data.choose_decoder(name, "imagenet2012")


TRAIN_32 = preprocess.TrainPreprocess(preprocess.imagenet_train, 32, 3)


def _decode_plans_on_the_cpu(size: int, device: jax.Device | None = None):
    """A stand-in for GpuJpegDecoder on ``device``: each plan row decoded, cropped, resized and
    mirrored on the CPU, which is what the cpu decoder computes for the same record; pixel rows
    as they are."""

    def decode_plans(plans: dict) -> dict:
        pixels = dict(zip(plans["pixel_rows"].tolist(), plans["pixels"], strict=True))
        images = []
        for i, box in enumerate(plans["box"]):
            if i in pixels:
                images.append(pixels[i])
                continue
            payload = plans["jpeg"][plans["offsets"][i] : plans["offsets"][i + 1]].tobytes()
            image = preprocess.crop(decode.decode_image(payload, 3), tuple(int(v) for v in box))
            image = preprocess.resize(image, size, size)
            images.append(image[:, ::-1] if plans["flip"][i] else image)
        return {"image": jax.device_put(np.stack(images), device)}

    return decode_plans


def _register_tiny_resnet(monkeypatch) -> str:
    """A one-stage plain ResNet registered for the test; returns its name."""
    from flax_attention.models import MODELS, BasicBlock, ModelSpec

    tiny = "tiny_resnet_for_input_tests"
    monkeypatch.setitem(MODELS, tiny, ModelSpec(tiny, BasicBlock, (1,), "test", "official", {}))
    return tiny


def _decode_with_stand_in(monkeypatch, plan_decoder) -> None:
    """For the test, GPU decoding counts as available and every GPU decoder `fit` chooses
    decodes with `plan_decoder(size, device)` (a CPU stand-in) instead of nvImageCodec."""
    monkeypatch.setattr(decoders, "gpu_decoding_available", lambda: True)
    choose = data.choose_decoder
    monkeypatch.setattr(
        data,
        "choose_decoder",
        lambda *args, **kwargs: dataclasses.replace(
            choose(*args, **kwargs), plan_decoder=plan_decoder
        ),
    )


def _recording_stand_in(seen: dict, key: str):
    """A ``PerDeviceDecoder`` factory of ``_decode_plans_on_the_cpu`` stand-ins that record,
    per device, the list ``plans[key]`` of the last plan rows that device decoded."""

    def make_decoder(size: int, device: jax.Device):
        decode = _decode_plans_on_the_cpu(size, device)

        def decode_rows(plans: dict) -> dict:
            seen[device] = plans[key].tolist()
            return decode(plans)

        return decode_rows

    return make_decoder


def _final(result: dict) -> dict:
    """A run's final evaluation and step, without its paths."""
    return {k: v for k, v in result.items() if k not in ("model_dir", "plot")}


def _training_records(workdir) -> list[dict]:
    """The training records (loss, accuracy, learning rate) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    keep = ("step", "loss", "top1", "lr")
    return [{k: r[k] for k in keep} for r in records if "loss" in r]


HYBRID_KWARGS = {"train": True, "batch_size": 4, "image_size": 32, "seed": 5}


class TestHybridDecoding:
    def test_rows_are_the_cpu_decoders_then_the_gpu_decoders_plans(self, photo_dir):
        kw = dict(HYBRID_KWARGS, data_dir=photo_dir)
        hybrid = data.make_loader("imagenet2012", **kw, decoder=data.HybridDecoder(cpu_share=0.5))
        cpu = data.make_loader("imagenet2012", **kw)
        gpu = data.make_loader("imagenet2012", **kw, decoder=data.GpuDecoder())
        for _ in range(8):  # Past the first epoch (6 batches).
            h, c, g = next(hybrid), next(cpu), next(gpu)
            assert h["pixels"].shape == (2, 32, 32, 3) and h["pixels"].dtype == np.uint8
            np.testing.assert_array_equal(h["pixel_rows"], [0, 1])
            np.testing.assert_array_equal(h["pixels"], c["image"][:2])
            np.testing.assert_array_equal(h["label"], c["label"])
            np.testing.assert_array_equal(h["box"][2:], g["box"][2:])
            np.testing.assert_array_equal(h["box"][:2], [[0, 0, 32, 32]] * 2)
            np.testing.assert_array_equal(h["flip"], [False, False, *g["flip"][2:]])
            assert h["jpeg"].tobytes() == g["jpeg"][g["offsets"][2] :].tobytes()
            np.testing.assert_array_equal(h["offsets"][2:], g["offsets"][2:] - g["offsets"][2])

    def test_batches_resume_exactly_from_a_position(self, photo_dir):
        kw = dict(HYBRID_KWARGS, data_dir=photo_dir, decoder=data.HybridDecoder(cpu_share=0.3))
        loader = data.make_loader("imagenet2012", **kw)
        batches = [next(loader) for _ in range(7)]
        resumed = data.make_loader("imagenet2012", **kw, start=4)
        for a, b in zip(batches[4:], [next(resumed) for _ in range(3)], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])

    def test_hybrid_decoder_puts_the_decoded_plans_after_the_cpu_rows(self, photo_dir):
        kw = dict(HYBRID_KWARGS, data_dir=photo_dir)
        decoder = data.HybridDecoder(cpu_share=0.25, plan_decoder=_decode_plans_on_the_cpu)
        hybrid = data.make_loader("imagenet2012", **kw, decoder=decoder)
        cpu = data.make_loader("imagenet2012", **kw)
        decode = decoder.input_to_device(lambda batch: batch, 32)
        for _ in range(3):
            out, expected = decode(next(hybrid)), next(cpu)
            np.testing.assert_array_equal(np.asarray(out["image"]), expected["image"])
            np.testing.assert_array_equal(np.asarray(out["label"]), expected["label"])

    def test_every_device_decodes_the_same_number_of_cpu_rows(self, photo_dir):
        """8 rows over 4 devices, half on the CPU: each device's block of 2 rows starts with
        one CPU row, and every row is the CPU decoder's."""
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        sharding = NamedSharding(Mesh(jax.devices()[:4], ("data",)), PartitionSpec("data"))
        kw = dict(HYBRID_KWARGS, batch_size=8, data_dir=photo_dir)
        pixel_rows: dict = {}
        make_decoder = _recording_stand_in(pixel_rows, "pixel_rows")
        decoder = data.HybridDecoder(cpu_share=0.5, plan_decoder=make_decoder)
        hybrid = data.make_loader("imagenet2012", **kw, decoder=decoder, devices=4)
        cpu = data.make_loader("imagenet2012", **kw)
        decode = decoder.input_to_device(lambda batch: batch, 32, sharding)
        for _ in range(4):  # Past the first epoch (3 batches).
            batch, expected = next(hybrid), next(cpu)
            np.testing.assert_array_equal(batch["pixel_rows"], [0, 2, 4, 6])
            np.testing.assert_array_equal(batch["pixels"], expected["image"][::2])
            out = decode(batch)
            assert pixel_rows == {d: [0] for d in sharding.addressable_devices}
            np.testing.assert_array_equal(np.asarray(out["image"]), expected["image"])

    def test_fit_on_several_devices_gives_each_device_its_share_of_cpu_rows(
        self, photo_dir, tmp_path, monkeypatch
    ):
        """`fit --decoder hybrid --parallel jit` on the 8 devices, batch 16 (2 rows each), half
        on the CPU: every device's training block holds one CPU row (the GPU decoder replaced
        by its CPU stand-in)."""
        from flax_attention.training import TrainConfig, fit

        tiny = _register_tiny_resnet(monkeypatch)
        training_blocks: dict = {}

        class StandInGpuDecoder:
            def __init__(self, size: int, device: jax.Device):
                self.device = device
                self.decode = _decode_plans_on_the_cpu(size, device)

            def __call__(self, plans: dict) -> dict:
                if len(plans["box"]) == 2:  # a training block (evaluation: 1 row per device)
                    training_blocks[self.device] = plans["pixel_rows"].tolist()
                return self.decode(plans)

        _decode_with_stand_in(monkeypatch, StandInGpuDecoder)
        config = TrainConfig(
            model=tiny,
            dataset="imagenet2012",
            data_dir=str(photo_dir),
            workdir=str(tmp_path),
            steps=1,
            batch_size=16,
            image_size=32,
            parallel="jit",
            decoder="hybrid",
            hybrid_cpu_share=0.5,
            eval_batch_size=8,
            progress=False,
        )
        fit(config)
        assert training_blocks == {d: [0] for d in jax.local_devices()}

    def test_fit_refuses_a_hybrid_batch_of_one_row_per_device_before_writing(
        self, photo_dir, tmp_path, monkeypatch
    ):
        """`fit --decoder hybrid` with one row per device (batch 8 on the 8 devices): a
        `ConfigError` naming the batch before the workdir gets a run record or metrics."""
        from flax_attention.training import TrainConfig, fit
        from flax_attention.training.config import ConfigError

        monkeypatch.setattr(decoders, "gpu_decoding_available", lambda: True)
        config = TrainConfig(
            model="resnet18",
            dataset="imagenet2012",
            data_dir=str(photo_dir),
            workdir=str(tmp_path / "run"),
            steps=1,
            batch_size=8,
            parallel="jit",
            decoder="hybrid",
            progress=False,
        )
        with pytest.raises(ConfigError, match=r"^batch_size 8 with --decoder hybrid: .* got 1$"):
            fit(config)
        written = [p.name for p in (tmp_path / "run").rglob("*") if p.is_file()]
        assert not [name for name in written if not name.endswith(".lock")]

    def test_cpu_rows_need_a_batch_that_splits_over_the_devices(self, photo_dir):
        kw = dict(HYBRID_KWARGS, batch_size=8, data_dir=photo_dir)
        decoder = data.HybridDecoder(cpu_share=0.5)
        with pytest.raises(ValueError, match=r"^8 rows do not split evenly over 3 devices$"):
            data.make_dataset("imagenet2012", **kw, decoder=decoder, devices=3)
        with pytest.raises(ValueError, match=r"at least 2 rows per device in a batch, got 1$"):
            data.make_dataset("imagenet2012", **kw, decoder=decoder, devices=8)

    def test_fit_with_gpu_and_hybrid_decoding_trains_on_the_cpu_decoders_batches(
        self, photo_dir, tmp_path, monkeypatch, capsys
    ):
        """`fit --decoder gpu` and `--decoder hybrid` end to end, the GPU decoder replaced by
        its CPU stand-in (the real one is compared on the GPU): the decoded plan rows (and the
        CPU workers' rows) make the cpu decoder's batches, so the runs end with the same
        metrics."""
        from flax_attention.training import TrainConfig, fit

        tiny = _register_tiny_resnet(monkeypatch)
        plan_rows = []

        class StandInGpuDecoder:
            def __init__(self, size: int, device: jax.Device):
                self.decode = _decode_plans_on_the_cpu(size, device)

            def __call__(self, plans: dict) -> dict:
                plan_rows.append(len(plans["box"]) - len(plans["pixel_rows"]))
                return self.decode(plans)

        def run(decoder: str, workdir, workers: int = 1) -> dict:
            config = TrainConfig(
                model=tiny,
                dataset="imagenet2012",
                data_dir=str(photo_dir),
                workdir=str(workdir),
                steps=3,
                batch_size=8,
                image_size=32,
                parallel="none",
                num_workers=workers,
                decoder=decoder,
                decode_threads=2,
                hybrid_cpu_share=0.25,
                eval_batch_size=6,
                log_every=1,
                progress=False,
            )
            return fit(config)

        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
        cpu = run("cpu", tmp_path / "cpu")
        assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
        _decode_with_stand_in(monkeypatch, StandInGpuDecoder)
        hybrid = run("hybrid", tmp_path / "hybrid")
        # Training: 8 rows, 2 on the CPU, 6 plans; evaluation: the 6 images, all plans.
        assert plan_rows and set(plan_rows) == {6}
        # Its decoder streams get hardware queues of their own (data.share_gpu_with_training).
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"
        expected = _training_records(tmp_path / "cpu")
        assert _training_records(tmp_path / "hybrid") == expected
        # Evaluation decodes centre crops on the "GPU": the crop box in whole source pixels.
        assert hybrid["eval_loss"] == pytest.approx(cpu["eval_loss"], rel=0.02)
        plan_rows.clear()
        gpu = run("gpu", tmp_path / "gpu")
        assert _training_records(tmp_path / "gpu") == expected
        assert gpu["eval_loss"] == hybrid["eval_loss"]
        assert plan_rows and set(plan_rows) == {8, 6}  # every row a plan
        assert "--num-workers" not in capsys.readouterr().out
        in_process = run("hybrid", tmp_path / "in_process", workers=0)
        assert in_process["eval_loss"] == hybrid["eval_loss"]  # the same batches, in-process
        assert "note: --decoder hybrid with --num-workers 0" in capsys.readouterr().out

    def test_gpu_sharing_sets_the_cuda_queue_count_unless_the_user_did(self, monkeypatch):
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
        data.share_gpu_with_training()
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4")
        data.share_gpu_with_training()
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "4"

    def test_cpu_rows_are_a_share_of_the_batch_with_both_decoders_used(self):
        from flax_attention.data.split_decode import cpu_rows_of

        assert cpu_rows_of(256, 0.375) == 96
        assert cpu_rows_of(4, 0.01) == 1 and cpu_rows_of(4, 0.99) == 3
        for share in (0.0, 1.0, -0.5):
            with pytest.raises(ValueError, match="cpu_share must be in"):
                cpu_rows_of(8, share)
        with pytest.raises(ValueError, match="at least 2 rows"):
            cpu_rows_of(1, 0.5)


NO_GPU_DECODING = pytest.mark.skipif(
    not data.gpu_decoding_available(),
    reason="GPU JPEG decoding needs a CUDA GPU, nvImageCodec and CuPy, which this machine lacks; "
    "benchmarks/lab/gpu_decode_check.py runs these comparisons on the GPU machine",
)
# The GPU decoders' documented difference from the CPU decoder's pixels (different JPEG decoders
# and resamplers on the same crops): mean abs difference, 99th percentile.
DECODER_TOLERANCE = (2.0, 12)
# Evaluation: also the centre crop's window rounded to whole source pixels (at most half a
# source pixel off); on these small images a larger share of an output pixel.
EVAL_TOLERANCE = (3.5, 16)


def _assert_close_to_the_cpu_decoder(
    images: np.ndarray, cpu_images: np.ndarray, tolerance: tuple = DECODER_TOLERANCE
) -> None:
    diff = np.abs(np.asarray(images).astype(int) - cpu_images)
    assert diff.mean() < tolerance[0], diff.mean()
    assert np.percentile(diff, 99) <= tolerance[1], np.percentile(diff, 99)


@NO_GPU_DECODING
def test_gpu_decoder_matches_the_cpu_decoder_and_its_host_reference(odd_photo_dir):
    kwargs = {"train": True, "batch_size": 12, "data_dir": odd_photo_dir, "image_size": 64}
    cpu = next(data.make_loader("imagenet2012", **kwargs))
    plans = next(data.make_loader("imagenet2012", **kwargs, decoder=data.GpuDecoder()))
    gpu = np.asarray(data.GpuJpegDecoder(64)(plans)["image"])
    _assert_close_to_the_cpu_decoder(gpu, cpu["image"])
    reference = np.asarray(data.CpuReferenceDecoder(64)(plans)["image"])
    assert np.abs(gpu.astype(int) - reference).mean() < 1.0  # Only the JPEG decoders differ.


@NO_GPU_DECODING
def test_hybrid_decoding_matches_the_cpu_decoder(photo_dir):
    kwargs = {"train": True, "batch_size": 6, "data_dir": photo_dir, "image_size": 64}
    cpu = next(data.make_loader("imagenet2012", **kwargs))
    decoder = data.HybridDecoder(cpu_share=0.5)
    split = next(data.make_loader("imagenet2012", **kwargs, decoder=decoder))
    out = decoder.input_to_device(lambda batch: batch, 64)(split)
    np.testing.assert_array_equal(np.asarray(out["label"]), cpu["label"])
    images = np.asarray(out["image"]).astype(int)
    np.testing.assert_array_equal(images[:3], cpu["image"][:3])
    _assert_close_to_the_cpu_decoder(images[3:], cpu["image"][3:])


ODD_KWARGS = {"train": True, "batch_size": 12, "image_size": 32, "num_epochs": 1}


class TestOddImagesAndBoundedCrops:
    def test_odd_records_are_the_kinds_real_imagenet_has(self, odd_photo_dir):
        import simplejpeg

        source = data.data_source("imagenet2012", "train", odd_photo_dir)
        kinds = {}  # By label: the record's place in writing order.
        for i in range(len(source)):
            payload, label = source[i]["image"], int(source[i]["label"])
            if not decode.is_jpeg(payload):
                kinds[label] = "png" if payload[:4] == b"\x89PNG" else "?"
                continue
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(payload)
            large = "large" if (height, width) == (525, 700) else "plain"
            kinds[label] = {"CMYK": "cmyk", "Gray": "gray"}.get(colorspace, large)
        kinds = [kinds[label] for label in range(len(source))]
        odd = len(photos.ODD_KINDS)
        assert tuple(kinds[:odd]) == photos.ODD_KINDS and set(kinds[odd:]) == {"plain"}

    def test_images_the_gpu_does_not_take_come_as_the_cpu_decoders_pixels(self, odd_photo_dir):
        kw = dict(ODD_KWARGS, data_dir=odd_photo_dir)
        cpu = next(data.make_loader("imagenet2012", **kw))
        plans = next(data.make_loader("imagenet2012", **kw, decoder=data.GpuDecoder()))
        labels = plans["label"][plans["pixel_rows"]]
        # The CMYK and PNG records (labels = record indices here) are decoded on the host.
        assert sorted(labels.tolist()) == [
            i for i, k in enumerate(photos.ODD_KINDS) if k in ("cmyk", "png")
        ]
        np.testing.assert_array_equal(plans["pixels"], cpu["image"][plans["pixel_rows"]])
        assert all(plans["offsets"][r] == plans["offsets"][r + 1] for r in plans["pixel_rows"])

    def test_gpu_path_on_odd_images_matches_the_cpu_decoder(self, odd_photo_dir):
        """The GPU decoder's arithmetic (``CpuReferenceDecoder``: box average, resample) on
        CMYK, grayscale, PNG and large images: host-decoded rows exact, the others within the
        documented tolerance; the large crop is box-averaged to the reduced side."""
        from flax_attention.data.gpu_decode import crop_layout

        kw = dict(ODD_KWARGS, data_dir=odd_photo_dir)
        cpu = next(data.make_loader("imagenet2012", **kw))
        plans = next(data.make_loader("imagenet2012", **kw, decoder=data.GpuDecoder()))
        out = np.asarray(data.CpuReferenceDecoder(32)(plans)["image"])
        np.testing.assert_array_equal(out[plans["pixel_rows"]], plans["pixels"])
        _assert_close_to_the_cpu_decoder(out, cpu["image"])
        layout = crop_layout(plans, 32)
        large = int(np.flatnonzero(plans["label"] == photos.ODD_KINDS.index("large"))[0])
        assert (layout.factors[large] > 1).any()
        assert layout.heights.max() <= 64 and layout.widths.max() <= 64

    def test_reduced_crops_are_bounded_whatever_the_crop(self):
        from flax_attention.data.gpu_decode import crop_layout, reduce_crop, reduced_side

        boxes = np.array([[0, 0, 4000, 3000], [5, 7, 64, 64], [0, 0, 129, 65], [0, 0, 1, 1]])
        batch = {"box": boxes.astype(np.int32), "pixel_rows": np.array([3], np.int32)}
        layout = crop_layout(batch, 32)
        assert reduced_side(32) == 64
        np.testing.assert_array_equal(layout.factors, [[63, 47], [1, 1], [3, 2], [1, 1]])
        np.testing.assert_array_equal(layout.heights, [63, 64, 43, 1])
        np.testing.assert_array_equal(layout.widths, [63, 64, 32, 1])
        np.testing.assert_array_equal(layout.jpeg_rows, [0, 1, 2])
        image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), np.uint8)
        reduced = reduce_crop(image, (2, 3))
        expected = image[:6].reshape(3, 2, 3, 3, 3).astype(float).mean(axis=(1, 3))
        np.testing.assert_array_equal(reduced, np.floor(expected + 0.5).astype(np.uint8))

    def test_decode_groups_hold_at_most_the_budget(self):
        from flax_attention.data.gpu_decode import decode_groups

        assert decode_groups([4, 4, 4, 9, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
        assert decode_groups([], 8) == []

    def test_eval_plans_are_centre_crops_padded_with_zero_rows(self, odd_photo_dir):
        kw = {"train": False, "batch_size": 5, "image_size": 32, "data_dir": odd_photo_dir}
        cpu = data.make_dataset("imagenet2012", **kw)[0]
        plans = data.make_dataset("imagenet2012", **kw, decoder=data.GpuDecoder())[0]
        assert not plans["flip"].any() and len(plans["pixel_rows"]) == 0
        like = {"image": np.zeros((0, 32, 32, 3), np.uint8), "label": np.zeros(0, np.int32)}
        padded = data.pad_plans(plans, 8, like)
        np.testing.assert_array_equal(padded["mask"], [1] * 5 + [0] * 3)
        np.testing.assert_array_equal(padded["pixel_rows"], [5, 6, 7])
        out = np.asarray(data.CpuReferenceDecoder(32)(padded)["image"])
        assert not out[5:].any()
        _assert_close_to_the_cpu_decoder(out[:5], cpu["image"], EVAL_TOLERANCE)
        empty = data.pad_plans(None, 3, like)
        np.testing.assert_array_equal(empty["mask"], [0, 0, 0])
        assert not np.asarray(data.CpuReferenceDecoder(32)(empty)["image"]).any()

    def test_centre_crop_box_is_the_window_center_crop_resizes(self):
        for height, width in [(375, 500), (500, 333), (90, 70), (100, 1000), (3000, 4000)]:
            top, left, h, w = preprocess.center_crop_box(height, width, 224)
            short = min(height, width) * 224 / round(224 / 0.875)
            assert abs(min(h, w) - short) <= 1
            # Centred within one output pixel (``center_crop`` rounds its window to them) and
            # half a source pixel (the box is in whole source pixels).
            pixel = max(height, width) / 224 + 0.5
            assert abs(top + h / 2 - height / 2) <= pixel and abs(left + w / 2 - width / 2) <= pixel
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width


class TestPerDeviceDecoding:
    """Each local device decodes the rows it holds (8 simulated CPU devices)."""

    def _batch(self, photo_dir, rows: int) -> dict:
        kw = {"train": True, "batch_size": rows, "image_size": 32, "data_dir": photo_dir}
        return next(data.make_loader("imagenet2012", **kw, decoder=data.GpuDecoder()))

    def test_each_device_decodes_its_rows_and_keeps_them(self, photo_dir):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices()[:4]
        mesh = Mesh(np.asarray(devices).reshape(2, 2), ("replica", "data"))
        sharding = NamedSharding(mesh, PartitionSpec(("replica", "data")))
        batch = self._batch(photo_dir, 8)
        decoded_by: dict = {}
        make_decoder = _recording_stand_in(decoded_by, "label")
        out = data.PerDeviceDecoder(make_decoder, 32, sharding, threads=2)(batch)
        assert out["image"].sharding == sharding and out["image"].shape == (8, 32, 32, 3)
        np.testing.assert_array_equal(out["label"], batch["label"])
        single = np.asarray(_decode_plans_on_the_cpu(32)(batch)["image"])
        np.testing.assert_array_equal(np.asarray(out["image"]), single)
        assert set(decoded_by) == set(devices)
        for shard in out["image"].addressable_shards:
            rows = shard.index[0]
            assert decoded_by[shard.device] == batch["label"][rows].tolist()
            np.testing.assert_array_equal(np.asarray(shard.data), single[rows])

    def test_gpu_decoder_feeds_the_training_sharding_without_a_copy(self, photo_dir):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        sharding = NamedSharding(Mesh(jax.devices(), ("data",)), PartitionSpec("data"))
        decoder = data.GpuDecoder(threads=1, plan_decoder=_decode_plans_on_the_cpu)
        placed = []

        def put_batch(batch: dict) -> dict:
            placed.append(batch["image"])
            return {k: jax.device_put(v, sharding) for k, v in batch.items()}

        out = decoder.input_to_device(put_batch, 32, sharding)(self._batch(photo_dir, 16))
        assert placed[0].sharding == sharding  # Assembled in place: put_batch moves nothing.
        assert out["image"].shape == (16, 32, 32, 3)

    def test_device_rows_follow_the_sharding(self):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from flax_attention.data.per_device import device_rows

        devices = jax.devices()[:4]
        sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
        assert [(d, a, b) for d, a, b in device_rows(sharding, 8)] == [
            (devices[i], 2 * i, 2 * i + 2) for i in range(4)
        ]
        with pytest.raises(ValueError, match="do not split evenly over 4 devices"):
            device_rows(sharding, 6)


class TestGpuDecodingSetup:
    def test_gpu_decoding_is_chosen_in_any_number_of_processes(self, monkeypatch):
        monkeypatch.setattr(decoders, "gpu_decoding_available", lambda: True)
        monkeypatch.setattr(jax, "process_count", lambda: 4)
        assert data.choose_decoder("auto", "imagenet2012") == data.GpuDecoder()
        assert data.choose_decoder("gpu", "imagenet2012") == data.GpuDecoder()

    def test_xla_leaves_the_decoders_memory_unless_the_user_chose(self, monkeypatch):
        from flax_attention.data import gpu_decode

        gib = 1 << 30
        assert gpu_decode.xla_memory_fraction(80 * gib) == 0.75  # JAX's default leaves 20 GiB
        assert gpu_decode.xla_memory_fraction(12 * gib) == 0.66  # 4 GiB outside XLA
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
        monkeypatch.setattr(gpu_decode, "gpu_memory_bytes", lambda: 8 * gib)
        data.prepare_decoding("gpu", "imagenet2012")
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.50"
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
        data.reserve_gpu_memory()
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
        monkeypatch.setattr(gpu_decode, "gpu_memory_bytes", lambda: None)  # no nvidia-smi
        data.reserve_gpu_memory()
        assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
