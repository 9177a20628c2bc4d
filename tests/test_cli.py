"""The `flax-attention` command, run in-process: convert end to end, mismatch report, what
convert refuses (writing nothing), usage errors (exit status 2, one line), list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from flax_attention import checkpoint
from flax_attention.cli import main
from flax_attention.convert import to_torch_state_dict
from flax_attention.models import BasicBlock, ResNet
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
    assert {
        m.use_running_average for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)
    } == {True}
    exported = to_torch_state_dict(model)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    assert main(argv) == 2  # OUTDIR exists: a usage error, found before any work
    assert one_line_error(capsys) == f"error: {out} already exists; pass --overwrite to replace it"


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


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def convert_exit(argv: list[str]) -> int:
    """The exit status of `main(argv)`, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "vgg"], "argument --model: unknown model 'vgg'; known: bam_resnet101"),
        (["--model", "resnet18"], "no weights file at"),
        (["--model", "resnet18", "--num-classes", "0"], "'0' is not a positive integer"),
        (["--model", "resnet18", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--model", "resnet18", "--layout", "keras"], "invalid choice: 'keras'"),
    ],
    ids=["model", "file", "num-classes", "dataset", "layout"],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, expected):
    argv = ["convert", str(tmp_path / "x.pth"), str(tmp_path / "o"), *args]
    assert convert_exit(argv) == 2
    assert expected in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda v: v.to(torch.int64), "conv1.weight: dtype int64 is not floating point"),
        (lambda v: v.index_fill(0, torch.tensor([0]), float("nan")), "conv1.weight: 147 NaN/inf"),
    ],
    ids=["int", "nan"],
)
def test_bad_tensors_are_refused_and_nothing_is_written(
    resnet18_pth, tmp_path, capsys, corrupt, expected
):
    _, state_dict = resnet18_pth
    src, out = tmp_path / "bad.pth", tmp_path / "out"
    torch.save({**state_dict, "conv1.weight": corrupt(state_dict["conv1.weight"])}, src)
    assert main(["convert", str(src), str(out), "--model", "resnet18"]) == 1
    message = one_line_error(capsys)
    assert message.startswith(f"error: {src}: ") and expected in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]
    kept = ResNet(BasicBlock, [1], num_classes=10, rngs=nnx.Rngs(0))
    checkpoint.save(kept, out)  # --overwrite of an existing checkpoint: left as it was
    before = checkpoint.read_metadata(out)
    assert main(["convert", str(src), str(out), "--model", "resnet18", "--overwrite"]) == 1
    assert checkpoint.read_metadata(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "out"]


def test_repeated_module_prefix_under_a_net_wrapper(resnet18_pth, tmp_path, capsys):
    _, state_dict = resnet18_pth
    src, out = tmp_path / "dp.pth", tmp_path / "out"
    torch.save({"net": {f"module.module.{k}": v for k, v in state_dict.items()}}, src)
    assert main(["convert", str(src), str(out), "--model", "resnet18", "--dataset", "cifar10"]) == 0
    assert "equals the input tensors: True" in capsys.readouterr().out
    assert checkpoint.read_metadata(out)["dataset"] == "cifar10"


def test_nothing_matching_names_what_the_file_holds(resnet18_pth, tmp_path, capsys):
    _, state_dict = resnet18_pth
    src = tmp_path / "wrapped.pth"
    torch.save({"ema": state_dict, "epoch": 3}, src)
    assert main(["convert", str(src), str(tmp_path / "o"), "--model", "resnet18"]) == 1
    assert "it has 'ema' (dict of 122 entries), 'epoch' (int)" in one_line_error(capsys)
    torch.save({f"backbone.{k}": v for k, v in state_dict.items()}, src)
    assert main(["convert", str(src), str(tmp_path / "o"), "--model", "resnet18"]) == 1
    message = one_line_error(capsys)
    assert "no tensor of" in message and "keys begin with 'backbone' (102 tensors)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrapped.pth"]


def test_list_and_help(capsys):
    assert main(["list", "resnet18"]) == 0
    printed = capsys.readouterr().out
    assert "cbam_resnet18" in printed and "Jongchan" in printed and "11,779,392" in printed
    assert "seresnet18" in printed and "timm" in printed
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "convert" in printed and "train a model" in printed


def test_train_is_a_command_with_the_training_programs_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", "cifar10", "--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: flax-attention train [-h] [--config NAME]")
    assert "(default: runs/cifar10)" in printed  # the config file's workdir
    assert main(["train", "--steps", "0"]) == 2
    assert one_line_error(capsys) == "error: steps must be >= 1 (got 0)"
    assert convert_exit(["train", "--no-such-flag"]) == 2
    message = one_line_error(capsys)
    assert "unrecognized arguments: --no-such-flag" in message
    assert message.endswith("(see flax-attention train --help)")
