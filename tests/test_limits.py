"""Bounded resources: worker counts, image sides and batches checked against the machine before
anything is allocated; images decoded within a pixel budget; `predict` in batches; worker
processes that die with their parent and leave no shared memory behind."""

from __future__ import annotations

import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest
from flax import nnx
from PIL import Image

from flax_attention import checkpoint, data
from flax_attention.checkpoint_metadata import CheckpointMetadataError, read_metadata
from flax_attention.cli import evaluate as cli_evaluate
from flax_attention.cli import load_image, main
from flax_attention.cli.train import main as train_main
from flax_attention.data import decode, limits, preprocess
from flax_attention.models import MODELS, BasicBlock, ModelSpec, create_model
from flax_attention.training.config import ConfigError, TrainConfig

training_evaluate = importlib.import_module("flax_attention.training.evaluate")
TINY = "tiny_se_resnet"
ARGS = {"num_classes": 10, "in_channels": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(digits data_dir, a saved tiny digits model_dir) with TINY registered for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(
            MODELS, TINY, ModelSpec(TINY, BasicBlock, (1,), "test", "official", {"attention": "se"})
        )
        root = tmp_path_factory.mktemp("limits")
        data.build_digits(root / "tfds")
        model = create_model(TINY, rngs=nnx.Rngs(0), **ARGS)
        model.eval()
        checkpoint.save(
            model, root / "model", name=TINY, constructor_args=ARGS, dataset="digits", image_size=16
        )
        yield root / "tfds", root / "model"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit RGB) followed by one tiny IDAT: a few
    hundred bytes that claim any number of pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is edited to say width x height."""
    encoded = bytearray(
        decode_encode_jpeg(np.zeros((8, 8, 3), np.uint8)),
    )
    sof = encoded.index(b"\xff\xc0")
    encoded[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(encoded)


def decode_encode_jpeg(image: np.ndarray) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(image, quality=90, colorspace="RGB")


# --- #27 item 3, case 1: worker processes bounded by the cores ---------------------------------


def test_num_workers_beyond_the_cores_is_refused_in_one_line(tmp_path, capsys):
    limit = max(4 * os.cpu_count(), 16)
    with pytest.raises(ConfigError, match=rf"num_workers must be <= {limit} \(4 per CPU core"):
        TrainConfig(num_workers=100000, workdir=str(tmp_path / "run"))
    TrainConfig(num_workers=limit, workdir=str(tmp_path / "run"))  # the limit itself is fine
    assert train_main(["--num-workers", "100000", "--workdir", str(tmp_path / "run")]) == 2
    assert "num_workers must be <=" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# --- case 5: image side, batch and eval batch against what fits --------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image_size": 100000}, "image_size must be <= 4096"),
        ({"batch_size": 1_000_000_000}, "batch_size: 1000000000 images of 16x16x1 need"),
        ({"eval_batch_size": 1_000_000_000}, "eval_batch_size: 1000000000 images of 16x16x1"),
        ({"batch_size": 2048, "image_size": 4096}, "batch_size: 2048 images of 4096x4096x1"),
    ],
)
def test_image_side_and_batches_past_what_fits_are_refused(values, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(dataset="digits", workdir=str(tmp_path / "run"), **values)


def test_training_program_refuses_a_huge_batch_at_once(tmp_path, capsys):
    argv = ["--batch-size", "1000000000", "--workdir", str(tmp_path / "run")]
    assert train_main(argv) == 2
    assert "memory" in one_line_error(capsys)


def test_model_folder_with_a_huge_image_size_is_refused(setup, tmp_path):
    _, model_dir = setup
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "state").mkdir()
    metadata = json.loads((model_dir / "flax_attention.json").read_text())
    metadata["image_size"] = 100000
    (folder / "flax_attention.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointMetadataError, match="'image_size' must be a positive integer"):
        read_metadata(folder)


def test_eval_batch_is_capped_at_the_split_size(setup, monkeypatch, capsys):
    data_dir, model_dir = setup
    real_pad = training_evaluate.pad_batch

    def pad_batch(batch, rows, like):
        assert rows <= 360, f"eval padded to {rows} rows for a 360-image split"
        return real_pad(batch, rows, like)

    monkeypatch.setattr(training_evaluate, "pad_batch", pad_batch)
    argv = ["eval", str(model_dir), "--data-dir", str(data_dir), "--batch-size", "1000000000"]
    assert main(argv) == 0
    assert "(360 images, 16x16)" in capsys.readouterr().out


def test_eval_batch_beyond_memory_is_refused(setup, monkeypatch, capsys):
    data_dir, model_dir = setup
    monkeypatch.setattr(limits, "memory_bytes", lambda: 1 << 16)  # a 64 KiB machine
    argv = ["eval", str(model_dir), "--data-dir", str(data_dir), "--batch-size", "300"]
    assert main(argv) == 2
    assert "--batch-size 300: 300 images of 16x16x1 need" in one_line_error(capsys)


# --- case 4: pixel budget on decode, extreme aspect ratios --------------------------------------


@pytest.mark.parametrize(
    "encoded",
    [png_header(10000, 9000), jpeg_claiming(10000, 9000)],
    ids=["png", "jpeg"],
)
def test_dataset_images_past_the_pixel_budget_are_refused_before_decoding(encoded):
    with pytest.raises(limits.ImageTooLargeError, match="10000x9000 pixels is more than"):
        decode.decode_image(encoded, 3)


@pytest.mark.parametrize("side", [10000, 20000], ids=["over-budget", "decompression-bomb"])
def test_predict_refuses_an_image_past_the_pixel_budget_naming_it(setup, tmp_path, side, capsys):
    _, model_dir = setup
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    assert main(["predict", str(model_dir), str(path)]) == 2
    line = one_line_error(capsys)
    assert str(path) in line and "pixels" in line, line


def test_extreme_aspect_ratio_is_resized_within_bounds(tmp_path, monkeypatch):
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 65000, 3), 200, np.uint8)).save(path)
    assert path.stat().st_size < 1000
    real_resize = preprocess.resize

    def resize(image, height, width):
        assert height * width <= 8 * 256 * 256, f"resize to {height}x{width}"
        return real_resize(image, height, width)

    monkeypatch.setattr(preprocess, "resize", resize)
    pixels = load_image(path, data.get_spec("imagenet2012"), 224)
    assert pixels.shape == (224, 224, 3)
    np.testing.assert_array_equal(pixels, 200)


def test_center_crop_of_ordinary_images_is_unchanged():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 500, 3), np.uint8)
    resized = preprocess.resize(image, 256, round(500 * 256 / 300))
    expected = preprocess.crop(resized, ((256 - 224) // 2, (resized.shape[1] - 224) // 2, 224, 224))
    np.testing.assert_array_equal(preprocess.center_crop(image, 224), expected)


# --- case 6: predict in batches -----------------------------------------------------------------


def test_predict_runs_in_batches(setup, tmp_path, monkeypatch, capsys):
    _, model_dir = setup
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(paths[-1])
    monkeypatch.setattr(cli_evaluate, "PREDICT_BATCH", 2, raising=False)
    rows: list[int] = []
    real_forward = cli_evaluate.jitted_forward

    def forward(model):
        run = real_forward(model)

        def counted(images):
            rows.append(images.shape[0])
            return run(images)

        return counted

    monkeypatch.setattr(cli_evaluate, "jitted_forward", forward)
    assert main(["predict", str(model_dir), *map(str, paths)]) == 0
    assert rows and max(rows) <= 2, rows
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [str(p) for p in paths]
    model = checkpoint.restore(None, model_dir)
    spec = data.get_spec("digits")
    pixels = np.stack([load_image(p, spec, 16) for p in paths])
    probs = jax.nn.softmax(model(data.normalize_images(pixels, spec.mean, spec.std)), axis=-1)
    best = np.argmax(np.asarray(probs), axis=-1)
    assert [int(line.split(": ")[1].split(" ")[0]) for line in printed] == best.tolist()


# --- cases 2 and 3: worker processes die with their parent, no leaked shared memory -------------

LOADER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import psutil
    from flax_attention import data

    def first_batch(data_dir, wait):
        loader = data.make_loader(
            "digits", train=True, batch_size=8, data_dir=data_dir, num_workers=2
        )
        batch = next(loader)
        children = psutil.Process().children(recursive=True)
        print(" ".join(str(child.pid) for child in children), flush=True)
        if wait:
            time.sleep(120)
        loader.close()
        return batch

    if __name__ == "__main__":
        batch = first_batch(sys.argv[1], sys.argv[2] == "wait")  # kept until the exit
    """
)


def run_loader_script(tmp_path: Path, data_dir: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(data_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_die_when_their_parent_is_killed(setup, tmp_path):
    data_dir, _ = setup
    process = run_loader_script(tmp_path, data_dir, "wait")
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
        assert len(pids) >= 2, process.stderr.read()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 10
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in pids if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"worker processes {survivors} outlived their killed parent"


def test_a_run_with_workers_leaks_no_shared_memory(setup, tmp_path):
    data_dir, _ = setup
    process = run_loader_script(tmp_path, data_dir, "exit")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "leaked shared_memory" not in err, err
    assert "Traceback" not in err, err
