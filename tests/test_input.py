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

    def test_resize_crops_is_pillows_antialiased_bilinear(self):
        from flax_attention.data.gpu_decode import resize_crops

        rng = np.random.default_rng(0)
        image = photos.photo(rng, 300, 400)
        boxes = [preprocess.random_resized_crop_box(300, 400, rng) for _ in range(6)]
        canvas = np.zeros((6, 320, 448, 3), np.uint8)  # Zero padding must not leak in.
        for i, box in enumerate(boxes):
            canvas[i, : box[2], : box[3]] = preprocess.crop(image, box)
        flips = np.array([False, True, False, True, False, False])
        heights, widths = np.array([b[2] for b in boxes]), np.array([b[3] for b in boxes])
        out = np.asarray(resize_crops(canvas, heights, widths, flips, 112))
        assert out.shape == (6, 112, 112, 3) and out.dtype == np.uint8
        for i, box in enumerate(boxes):
            expected = _pil_resized_crop(image, box, 112)
            expected = expected[:, ::-1] if flips[i] else expected
            diff = np.abs(out[i].astype(int) - expected)
            # Pillow rounds to uint8 between its two passes and uses fixed-point weights.
            assert diff.mean() < 0.25 and diff.max() <= 6, (box, diff.mean(), diff.max())

    def test_crop_plan_draws_what_the_cpu_path_draws(self):
        from flax_attention.data.gpu_decode import CropPlan

        _, payload = _photo_jpeg(3, 150, 200)
        for seed in range(10):
            plan = CropPlan()({"image": payload, "label": 7}, np.random.default_rng(seed))
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

    def test_gpu_plan_batches_are_deterministic_and_resume_exactly(self, photo_dir):
        kwargs = {"train": True, "batch_size": 4, "data_dir": photo_dir}
        kwargs["decoder"] = data.GpuDecoder()
        loader = data.make_loader("imagenet2012", **kwargs)
        batch = next(loader)
        assert set(batch) == {"jpeg", "offsets", "box", "flip", "label"}
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
                ValueError, match=f"--decoder {name} cannot be used: it needs a CUDA"
            ):
                data.choose_decoder(name, "imagenet2012")


def _decode_plans_on_the_cpu(size: int):
    """A stand-in for GpuJpegDecoder: each plan row decoded, cropped, resized and mirrored on
    the CPU, which is what the cpu decoder computes for the same record."""

    def decode_plans(plans: dict) -> dict:
        images = []
        for i, box in enumerate(plans["box"]):
            payload = plans["jpeg"][plans["offsets"][i] : plans["offsets"][i + 1]].tobytes()
            image = preprocess.crop(decode.decode_image(payload, 3), tuple(int(v) for v in box))
            image = preprocess.resize(image, size, size)
            images.append(image[:, ::-1] if plans["flip"][i] else image)
        return {"image": jnp.asarray(np.stack(images)), "label": jnp.asarray(plans["label"])}

    return decode_plans


def _final(result: dict) -> dict:
    """A run's final evaluation and step, without its paths."""
    return {k: v for k, v in result.items() if k not in ("model_dir", "plot")}


HYBRID_KWARGS = {"train": True, "batch_size": 4, "image_size": 32, "seed": 5}


class TestHybridDecoding:
    def test_rows_are_the_cpu_decoders_then_the_gpu_decoders_plans(self, photo_dir):
        kw = dict(HYBRID_KWARGS, data_dir=photo_dir)
        hybrid = data.make_loader("imagenet2012", **kw, decoder=data.HybridDecoder(cpu_share=0.5))
        cpu = data.make_loader("imagenet2012", **kw)
        gpu = data.make_loader("imagenet2012", **kw, decoder=data.GpuDecoder())
        for _ in range(8):  # Past the first epoch (6 batches).
            h, c, g = next(hybrid), next(cpu), next(gpu)
            assert h["image"].shape == (2, 32, 32, 3) and h["image"].dtype == np.uint8
            np.testing.assert_array_equal(h["image"], c["image"][:2])
            np.testing.assert_array_equal(h["label"], c["label"])
            np.testing.assert_array_equal(h["box"], g["box"][2:])
            np.testing.assert_array_equal(h["flip"], g["flip"][2:])
            assert h["jpeg"].tobytes() == g["jpeg"][g["offsets"][2] :].tobytes()
            np.testing.assert_array_equal(h["offsets"], g["offsets"][2:] - g["offsets"][2])

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

    def test_fit_with_gpu_and_hybrid_decoding_trains_on_the_cpu_decoders_batches(
        self, photo_dir, tmp_path, monkeypatch, capsys
    ):
        """`fit --decoder gpu` and `--decoder hybrid` end to end, the GPU decoder replaced by
        its CPU stand-in (the real one is compared on the GPU): the decoded plan rows (and the
        CPU workers' rows) make the cpu decoder's batches, so the runs end with the same
        metrics."""
        from flax_attention.models import MODELS, BasicBlock, ModelSpec
        from flax_attention.training import TrainConfig, fit

        tiny = "tiny_resnet_for_input_tests"
        monkeypatch.setitem(MODELS, tiny, ModelSpec(tiny, BasicBlock, (1,), "test", "official", {}))
        plan_rows = []

        class StandInGpuDecoder:
            def __init__(self, size: int):
                self.decode = _decode_plans_on_the_cpu(size)

            def __call__(self, plans: dict) -> dict:
                plan_rows.append(len(plans["box"]))
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
        monkeypatch.setattr(decoders, "gpu_decoding_available", lambda: True)
        choose = data.choose_decoder
        monkeypatch.setattr(
            data,
            "choose_decoder",
            lambda *args, **kwargs: dataclasses.replace(
                choose(*args, **kwargs), plan_decoder=StandInGpuDecoder
            ),
        )
        hybrid = run("hybrid", tmp_path / "hybrid")
        assert plan_rows and set(plan_rows) == {6}  # 8 rows: 2 on the CPU, 6 plans
        # Its decoder streams get hardware queues of their own (data.share_gpu_with_training).
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"
        assert _final(hybrid) == _final(cpu)
        plan_rows.clear()
        assert _final(run("gpu", tmp_path / "gpu")) == _final(cpu)
        assert plan_rows and set(plan_rows) == {8}  # every row a plan
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


@pytest.mark.skipif(
    not data.gpu_decoding_available(),
    reason="GPU JPEG decoding needs a CUDA GPU, nvImageCodec and CuPy, which this machine lacks; "
    "the benchmarks' input suite runs this comparison on the GPU machine",
)
@pytest.mark.parametrize("region_decode", [True, False])
def test_gpu_decoder_matches_the_cpu_decoder(photo_dir, region_decode):
    kwargs = {"train": True, "batch_size": 6, "data_dir": photo_dir, "image_size": 64}
    cpu = next(data.make_loader("imagenet2012", **kwargs))
    plans = next(data.make_loader("imagenet2012", **kwargs, decoder=data.GpuDecoder()))
    gpu = data.GpuJpegDecoder(64, region_decode=region_decode)(plans)
    np.testing.assert_array_equal(np.asarray(gpu["label"]), cpu["label"])
    diff = np.abs(np.asarray(gpu["image"]).astype(int) - cpu["image"])
    # Different JPEG decoders (nvJPEG / libjpeg-turbo) and resamplers (antialiased bilinear /
    # OpenCV area): the same crops, a small difference.
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12


@pytest.mark.skipif(
    not data.gpu_decoding_available(),
    reason="GPU JPEG decoding needs a CUDA GPU, nvImageCodec and CuPy, which this machine lacks; "
    "the benchmarks' input suite runs this comparison on the GPU machine",
)
def test_hybrid_decoding_matches_the_cpu_decoder(photo_dir):
    kwargs = {"train": True, "batch_size": 6, "data_dir": photo_dir, "image_size": 64}
    cpu = next(data.make_loader("imagenet2012", **kwargs))
    decoder = data.HybridDecoder(cpu_share=0.5)
    split = next(data.make_loader("imagenet2012", **kwargs, decoder=decoder))
    out = decoder.input_to_device(lambda batch: batch, 64)(split)
    np.testing.assert_array_equal(np.asarray(out["label"]), cpu["label"])
    images = np.asarray(out["image"]).astype(int)
    np.testing.assert_array_equal(images[:3], cpu["image"][:3])
    diff = np.abs(images[3:] - cpu["image"][3:])
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12


def test_canvas_sides_are_few_and_hold_the_crop():
    from flax_attention.data.gpu_decode import canvas_side

    sides = {canvas_side(n) for n in range(1, 2049)}
    assert sides == {64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048}
    assert all(n <= canvas_side(n) <= max(64, 1.5 * n) for n in range(1, 2049))
