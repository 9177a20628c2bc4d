"""`flax-attention eval` and `predict` on a saved digits model: the numbers equal a direct
evaluation of the restored model, the images get the dataset's evaluation preprocessing."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flax_attention import checkpoint, data
from flax_attention.cli import load_image, main
from flax_attention.models import MODELS, BasicBlock, ModelSpec, create_model

TINY = "tiny_se_resnet"  # one SE BasicBlock stage: fast to compile on CPU
ARGS = {"num_classes": 10, "in_channels": 1}


def randomize(model: nnx.Module) -> None:
    """Every array of `model` drawn from N(0, 0.3) (seed 0), BatchNorm variances kept positive
    (|v| + 0.5)."""
    rng = np.random.default_rng(0)
    nnx.update(
        model,
        jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), nnx.state(model)),
    )
    for _, bn in nnx.iter_graph(model):
        if isinstance(bn, nnx.BatchNorm):
            bn.var.set_value(np.abs(bn.var.get_value()) + 0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data_dir, model_dir, images dir) with TINY registered for the module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(
            MODELS, TINY, ModelSpec(TINY, BasicBlock, (1,), "test", "official", {"attention": "se"})
        )
        root = tmp_path_factory.mktemp("eval")
        data.build_digits(root / "tfds")
        model = nnx.eval_shape(lambda: create_model(TINY, rngs=nnx.Rngs(0), **ARGS))
        randomize(model)
        checkpoint.save(
            model, root / "model", name=TINY, constructor_args=ARGS, dataset="digits", image_size=16
        )
        checkpoint.save(model, root / "no_dataset", name=TINY, constructor_args=ARGS)
        rgb = nnx.eval_shape(lambda: create_model(TINY, rngs=nnx.Rngs(0), num_classes=10))
        randomize(rgb)
        rgb_args = {"num_classes": 10}
        checkpoint.save(
            rgb, root / "cifar", name=TINY, constructor_args=rgb_args, dataset="cifar10"
        )
        yield root / "tfds", root / "model", root


def direct_logits(model_dir, images: np.ndarray, dataset: str = "digits") -> np.ndarray:
    """The restored model's logits on uint8 evaluation `images`, normalised as the steps do."""
    spec = data.get_spec(dataset)
    model = checkpoint.restore(None, model_dir)
    return np.asarray(model(data.normalize_images(images, spec.mean, spec.std)), np.float64)


def test_eval_prints_top1_top5_loss_of_the_restored_model(setup, capsys):
    data_dir, model_dir, _ = setup
    argv = ["eval", str(model_dir), "--data-dir", str(data_dir), "--batch-size", "100"]
    assert main(argv) == 0  # 360 test images: 3 full batches and a padded one
    printed = capsys.readouterr().out
    batch = data.make_dataset("digits", train=False, batch_size=360, data_dir=data_dir)[0]
    logits, labels = direct_logits(model_dir, batch["image"]), batch["label"]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    top1 = (top5[:, 0] == labels).mean()
    top5 = (top5 == labels[:, None]).any(-1).mean()
    loss = -log_probs[np.arange(360), labels].mean()
    expected = (
        f"on digits test (360 images, 16x16): top-1 {top1:.2%}, top-5 {top5:.2%}, loss {loss:.4f}"
    )
    assert expected in printed, printed


def test_eval_split_and_dataset_flags(setup, capsys):
    data_dir, model_dir, root = setup
    base = ["eval", str(model_dir), "--data-dir", str(data_dir)]
    assert main([*base, "--split", "train[:50]", "--dataset", "digits"]) == 0
    assert "on digits train[:50] (50 images, 16x16)" in capsys.readouterr().out
    assert main([*base, "--split", "tests"]) == 2
    assert capsys.readouterr().err.startswith("error: --split 'tests': Unknown split 'tests'")
    assert main([*base, "--dataset", "cifar100"]) == 2
    assert capsys.readouterr().err == f"error: {model_dir} has 10 classes, dataset 'cifar100' 100\n"
    assert main(["eval", str(root / "no_dataset"), "--data-dir", str(data_dir)]) == 2
    assert "records no dataset (converted weights?); pass --dataset NAME" in capsys.readouterr().err


def test_predict_prints_the_top5_digits_of_each_image(setup, tmp_path, capsys):
    data_dir, model_dir, _ = setup
    source = data.data_source("digits", "test", data_dir)
    paths = [tmp_path / f"digit{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        Image.fromarray(source[i]["image"][..., 0]).save(path)
    batch = data.make_dataset("digits", train=False, batch_size=3, data_dir=data_dir)[0]
    spec = data.get_spec("digits")
    for i, path in enumerate(paths):  # exactly the evaluation pipeline's input
        np.testing.assert_array_equal(load_image(path, spec, 16), batch["image"][i])

    assert main(["predict", str(model_dir), *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    logits = direct_logits(model_dir, batch["image"])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert len(lines) == 3
    for line, path, p in zip(lines, paths, probs, strict=True):
        top = np.argsort(-p)[:5]
        assert line == f"{path}: " + ", ".join(f"{c} {p[c]:.2%}" for c in top)
        assert re.fullmatch(r"\S+: (\d \d+\.\d\d%, ){4}\d \d+\.\d\d%", line)


def test_predict_refuses_what_is_not_an_image(setup, tmp_path, capsys):
    _, model_dir, _ = setup
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", str(model_dir), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not an image Pillow can read") and err.count("\n") == 1
    assert main(["predict", str(model_dir), str(tmp_path / "absent.png")]) == 2
    assert capsys.readouterr().err == f"error: no image file at {tmp_path / 'absent.png'}\n"


def test_predict_names_cifar10_classes_and_prints_indices_otherwise(setup, tmp_path, capsys):
    _, _, root = setup
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(photo)
    assert main(["predict", str(root / "cifar"), str(photo)]) == 0
    names = "airplane|automobile|bird|cat|deer|dog|frog|horse|ship|truck"
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"{photo}: (({names}) \d+\.\d\d%(, |$)){{5}}", line), line
    assert main(["predict", str(root / "cifar"), str(photo), "--dataset", "imagenet2012"]) == 0
    line = capsys.readouterr().out.strip()  # 224x224 center crop; no ImageNet names here
    assert re.fullmatch(rf"{photo}: (\d \d+\.\d\d%(, |$)){{5}}", line), line


def _printed_numbers(text: str) -> tuple[float, float, float]:
    """(top-1, top-5, loss) of an `eval` line."""
    found = re.search(r"top-1 ([\d.]+)%, top-5 ([\d.]+)%, loss ([\d.]+)", text)
    assert found, text
    return tuple(float(v) for v in found.groups())


def test_eval_on_the_gpu_decoder_gives_the_cpu_decoders_numbers(tmp_path, monkeypatch, capsys):
    """`eval --decoder gpu` decodes centre-crop plans on the device (the GPU decoder's
    arithmetic on the host, ``CpuReferenceDecoder``, where there is no GPU): the numbers of
    `--decoder cpu` within the documented tolerance, on CMYK, PNG and large images too."""
    from flax_attention.data import decoders, photos

    monkeypatch.setitem(
        MODELS, TINY, ModelSpec(TINY, BasicBlock, (1,), "test", "official", {"attention": "se"})
    )
    photos.write_photo_dataset(
        tmp_path / "tfds",
        num_train=8,
        num_eval=20,
        heights=(60, 90),
        widths=(70, 100),
        odd_images=True,
        large_side=400,
    )
    capsys.readouterr()  # tfds' progress
    model = create_model(TINY, rngs=nnx.Rngs(0), num_classes=1000)
    randomize(model)  # weights that make the logits follow the pixels closely
    model_dir = tmp_path / "model"
    checkpoint.save(
        model,
        model_dir,
        name=TINY,
        constructor_args={"num_classes": 1000},
        dataset="imagenet2012",
        image_size=32,
    )
    base = ["eval", str(model_dir), "--data-dir", str(tmp_path / "tfds"), "--batch-size", "8"]
    assert main([*base, "--decoder", "gpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --decoder gpu cannot be used: it needs CUDA")
    assert main([*base, "--decoder", "cpu"]) == 0
    cpu = _printed_numbers(capsys.readouterr().out)
    decoded = []

    mirror = []  # Set: a control, the same images mirrored.

    def stand_in(size, device):
        decode = data.CpuReferenceDecoder(size, device)

        def decode_plans(plans):
            decoded.append(len(plans["box"]))
            return decode(plans | {"flip": ~plans["flip"]} if mirror else plans)

        return decode_plans

    choose = data.choose_decoder
    monkeypatch.setattr(decoders, "gpu_decoding_available", lambda: True)
    monkeypatch.setattr(
        data,
        "choose_decoder",
        lambda *a, **k: dataclasses.replace(choose(*a, **k), plan_decoder=stand_in),
    )
    assert main([*base, "--decoder", "gpu"]) == 0
    gpu = _printed_numbers(capsys.readouterr().out)
    assert decoded == [8, 8, 8]  # 20 images: two batches and a padded one
    mirror.append(True)
    assert main([*base, "--decoder", "gpu"]) == 0
    mirrored = _printed_numbers(capsys.readouterr().out)
    # The decoders' difference moves the loss far less than mirroring the images does.
    assert abs(gpu[2] - cpu[2]) < 0.25 * abs(mirrored[2] - cpu[2])
    assert abs(gpu[0] - cpu[0]) <= 5.0 and abs(gpu[1] - cpu[1]) <= 5.0  # one image of 20
