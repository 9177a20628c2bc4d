"""The `flax-attention` command, run in-process: convert end to end, mismatch report, list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flax_attention import checkpoint
from flax_attention.cli import main
from flax_attention.convert import to_torch_state_dict
from flax_attention.reference.models import reference


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
    torch_ref = reference("resnet18", num_classes=10)
    path = tmp_path_factory.mktemp("pth") / "resnet18.pth"
    torch.save(torch_ref.state_dict(), path)
    return path, torch_ref.state_dict()


def test_convert_end_to_end(resnet18_pth, tmp_path, capsys):
    src, state_dict = resnet18_pth
    out = tmp_path / "resnet18"
    argv = [
        "convert",
        str(src),
        str(out),
        "--model",
        "resnet18",
        "--layout",
        "official",
        "--num-classes",
        "10",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "102 loaded, 0 missing" in printed
    assert "11,181,642" in printed  # resnet18 with a 10-class head
    assert "equals the input tensors: True" in printed and "finite: True" in printed

    model = checkpoint.restore(None, out)
    exported = to_torch_state_dict(model)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    assert main(argv) == 1  # OUTDIR exists
    assert "already exists" in capsys.readouterr().err


def test_convert_mismatch_exits_nonzero_with_the_key_report(resnet18_pth, tmp_path, capsys):
    src, _ = resnet18_pth
    out = tmp_path / "cbam"
    assert main(["convert", str(src), str(out), "--model", "cbam_resnet18"]) == 1
    err = capsys.readouterr().err
    assert "missing key: layer1.0.cbam.ChannelGate.mlp.1.weight" in err
    assert not out.exists()


def test_convert_no_strict_reports_what_was_not_loaded(resnet18_pth, tmp_path, capsys):
    _, state_dict = resnet18_pth
    src = tmp_path / "extra.pth"
    torch.save({**state_dict, "aux.weight": torch.zeros(3)}, src)
    argv = ["convert", str(src), str(tmp_path / "out"), "--model", "resnet18"]
    assert main(argv) == 1
    assert "unexpected key: aux.weight" in capsys.readouterr().err
    assert main([*argv, "--no-strict"]) == 0
    printed = capsys.readouterr().out
    assert "102 loaded, 0 missing, 1 unexpected" in printed
    assert "not loaded: aux.weight" in printed


def test_unknown_model_and_missing_file(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "x.pth"), str(tmp_path / "o"), "--model", "vgg"]) == 1
    assert "registered models" in capsys.readouterr().err
    assert (
        main(["convert", str(tmp_path / "x.pth"), str(tmp_path / "o"), "--model", "resnet18"]) == 1
    )
    assert "no checkpoint file" in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["list", "resnet18"]) == 0
    printed = capsys.readouterr().out
    assert "cbam_resnet18" in printed and "Jongchan" in printed and "11,779,392" in printed
    assert "seresnet18" in printed and "timm" in printed
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "convert" in capsys.readouterr().out
