"""`create_model(name, pretrained=...)`: local files and `hf-hub:` specs, offline, against a
Hugging Face cache the tests build themselves (models--ORG--REPO/{refs/main,snapshots/HASH/})."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from huggingface_hub import constants
from safetensors.numpy import save_file

from flax_attention.convert import to_torch_state_dict
from flax_attention.models import (
    HUB_WEIGHTS,
    WeightsNotFoundError,
    create_model,
    pretrained_weights,
    resolve_weights,
)
from flax_attention.models.pretrained import read_weights

REPO = "timm/resnet18.tv_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo: str, files: dict[str, bytes | dict[str, np.ndarray]]) -> None:
    """Lay out `files` (bytes, or a state_dict written as safetensors) as a cached snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snapshot / name).write_bytes(content)
        else:
            save_file(content, str(snapshot / name))


@pytest.fixture(scope="module")
def resnet18_weights() -> dict[str, np.ndarray]:
    """A resnet18 state_dict under torchvision's names (random values, seed 1)."""
    return to_torch_state_dict(create_model("resnet18", rngs=nnx.Rngs(1)))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, resnet18_weights) -> Path:
    """An offline Hub whose cache holds REPO's model.safetensors."""
    cache = tmp_path / "hub"
    add_to_cache(cache, REPO, {"model.safetensors": resnet18_weights})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def assert_holds(model: nnx.Module, weights: dict[str, np.ndarray], skip=()) -> None:
    exported = to_torch_state_dict(model)
    for key, value in weights.items():
        if key not in skip:
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_pretrained_true_loads_the_default_hub_weights_in_eval_mode(
    offline_cache, resnet18_weights
):
    assert pretrained_weights("resnet18")[0].repo == REPO
    model = create_model("resnet18", pretrained=True)
    assert_holds(model, resnet18_weights)
    assert model.bn1.use_running_average  # eval mode: inference-ready


def test_hub_spec_with_file_and_local_path(offline_cache, resnet18_weights, tmp_path):
    model = create_model("resnet18", pretrained=f"hf-hub:{REPO}/model.safetensors")
    assert_holds(model, resnet18_weights)
    local = tmp_path / "r18.safetensors"
    save_file(resnet18_weights, str(local))
    assert_holds(create_model("resnet18", pretrained=local), resnet18_weights)
    assert_holds(create_model("resnet18", pretrained=str(local)), resnet18_weights)


def test_other_classifier_width_keeps_a_fresh_head(offline_cache, resnet18_weights):
    model = create_model("resnet18", num_classes=10, pretrained=True, rngs=nnx.Rngs(2))
    assert_holds(model, resnet18_weights, skip=("fc.weight", "fc.bias"))
    assert model.fc.kernel.get_value().shape == (512, 10)
    fresh = create_model("resnet18", num_classes=10, rngs=nnx.Rngs(2))
    np.testing.assert_array_equal(model.fc.kernel.get_value(), fresh.fc.kernel.get_value())


def test_without_a_file_name_the_bin_is_used_when_there_is_no_safetensors(offline_cache):
    add_to_cache(offline_cache, "timm/resnet34.tv_in1k", {"pytorch_model.bin": b"x"})
    path = resolve_weights("hf-hub:timm/resnet34.tv_in1k")
    assert path.name == "pytorch_model.bin" and path.read_bytes() == b"x"


def test_not_cached_and_offline_is_one_clear_line(offline_cache):
    with pytest.raises(WeightsNotFoundError) as info:
        create_model("resnet50", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "hf-hub:timm/resnet50.tv_in1k" in message and str(offline_cache) in message
    assert "HF_HUB_OFFLINE" in message and "model.safetensors" in message


def test_bad_sources_are_named(offline_cache, tmp_path):
    with pytest.raises(ValueError, match="no default pretrained weights for 'cbam_resnet50'"):
        create_model("cbam_resnet50", pretrained=True)
    with pytest.raises(ValueError, match="expected hf-hub:ORG/REPO"):
        create_model("resnet18", pretrained="hf-hub:timm")
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        create_model("resnet18", pretrained=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="pretrained must be True"):
        create_model("resnet18", pretrained=1)
    with pytest.raises(ValueError, match=rf"hf-hub:{REPO} \(.*\) does not fit seresnet18"):
        create_model("seresnet18", pretrained=f"hf-hub:{REPO}")


def test_known_hub_weights_carry_their_layout(offline_cache):
    assert {w.layout for w in HUB_WEIGHTS if w.model.startswith("seresnet")} == {"timm"}
    repo = "timm/seresnet50.a1_in1k"
    add_to_cache(offline_cache, repo, {"model.safetensors": {"x": np.zeros(2, np.float32)}})
    assert read_weights("seresnet50", True, "official").layout == "timm"
    assert read_weights("seresnet50", f"hf-hub:{repo}", "official").layout == "timm"


def test_offline_environment_end_to_end(tmp_path, resnet18_weights):
    """HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them (read at import)."""
    add_to_cache(tmp_path, REPO, {"model.safetensors": resnet18_weights})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    code = (
        "from flax_attention.models import create_model\n"
        "m = create_model('resnet18', pretrained='hf-hub:timm/resnet18.tv_in1k')\n"
        "print(float(m.conv1.kernel.get_value().sum()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = resnet18_weights["conv1.weight"].sum(dtype=np.float32)
    assert float(out.stdout) == pytest.approx(float(expected), rel=1e-6)
