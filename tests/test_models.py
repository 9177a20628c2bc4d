"""ResNet-family models: parameter counts, parity with PyTorch references, conversion reports."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from parity import nchw, nhwc, rel_l2

from flax_attention import checkpoint
from flax_attention.cli import main
from flax_attention.convert import (
    StateDictMismatchError,
    load_torch_state_dict,
    to_torch_state_dict,
)
from flax_attention.convert.keymap import bindings
from flax_attention.models import (
    ATTENTION_PRESETS,
    MODELS,
    BasicBlock,
    Bottleneck,
    EPSABlock,
    ModelSpec,
    ResNet,
    create_model,
    get_spec,
    list_models,
)
from flax_attention.reference.models import (
    ATTENTION,
    TorchBasicBlock,
    TorchBottleneck,
    TorchEPSABlock,
    TorchResNet,
    randomize_batchnorms_,
    reference,
    torch_model,
)

TOL = 1e-4
NUM_CLASSES = 10

# Whole-model parameter counts, from the specification's "ResNet scaffolding" and "PSA" sections.
PARAM_COUNTS = {
    "resnet50": 25_557_032,
    "cbam_resnet50": 28_089_624,
    "bam_resnet50": 25_915_099,
    "cbam_resnet18": 11_779_392,
    "bam_resnet18": 11_712_503,
    "seresnet50": 28_088_024,
    "se_resnet50": 28_071_976,
    "epsanet50_small": 22_561_715,
    "epsanet101_small": 38_900_279,
}


def abstract_model(name: str, **kw) -> nnx.Module:
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kw))


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def ported(name: str, torch_ref: torch.nn.Module) -> nnx.Module:
    """Flax model `name` filled (strictly) from `torch_ref`, in eval mode."""
    model = abstract_model(name, num_classes=NUM_CLASSES)
    load_torch_state_dict(model, torch_ref.state_dict(), layout=get_spec(name).layout)
    model.eval()
    return model


def tiny_epsanet() -> tuple[nnx.Module, torch.nn.Module]:
    """EPSANet with one EPSABlock per stage (the registered ones are depth 50 and 101)."""
    torch.manual_seed(0)
    torch_ref = randomize_batchnorms_(TorchResNet(TorchEPSABlock, (1, 1, 1, 1), NUM_CLASSES))
    model = nnx.eval_shape(
        lambda: ResNet(EPSABlock, (1, 1, 1, 1), num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
    )
    load_torch_state_dict(model, torch_ref.state_dict())
    model.eval()
    return model, torch_ref.eval()


def jit_features(model: nnx.Module, x: np.ndarray):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v, return_features=True))
    return fn(state, jnp.asarray(x))


def random_images(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3), dtype=np.float32)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_counts_match_spec(name):
    assert count_params(abstract_model(name)) == PARAM_COUNTS[name]
    assert sum(p.numel() for p in torch_model(name).parameters()) == PARAM_COUNTS[name]
    assert get_spec(name).params == PARAM_COUNTS[name]


def test_recorded_parameter_counts_match_the_pytorch_references():
    """Every registry count (what `flax-attention list` prints) against the reference model;
    the nine above are also checked against the built Flax models."""
    for name in list_models():
        with torch.device("meta"):  # shapes only
            reference_count = sum(p.numel() for p in torch_model(name).parameters())
        assert get_spec(name).params == reference_count, name


def test_models_are_listed_in_natural_order_without_building(monkeypatch, capsys):
    names = list_models()
    assert names.index("resnet18") < names.index("resnet34") < names.index("resnet101")
    assert names.index("resnet101") < names.index("resnet152") < names.index("se_resnet18")

    def no_build(*args, **kwargs):
        raise AssertionError("listing built a model")

    monkeypatch.setattr(ModelSpec, "build", no_build)
    assert main(["list", "resnet1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == [
        "bam_resnet18", "bam_resnet101", "cbam_resnet18", "cbam_resnet101",
        "resnet18", "resnet101", "resnet152", "se_resnet18", "se_resnet101", "se_resnet152",
        "seresnet18", "seresnet101", "seresnet152",
    ]  # fmt: skip
    assert rows[4][3] == f"{MODELS['resnet18'].params:,}" and rows[4][4].startswith("hf-hub:")


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "se_resnet18",
        "seresnet18",
        "cbam_resnet18",
        "bam_resnet18",
        "resnet50",
        "se_resnet50",
        "seresnet50",
        "cbam_resnet50",
        "bam_resnet50",
        "epsanet50_small",
        "epsanet_tiny",
    ],
)
def test_logits_and_stage_features_match_pytorch(name):
    if name == "epsanet_tiny":
        model, torch_ref = tiny_epsanet()
    else:
        torch_ref = reference(name, NUM_CLASSES)
        model = ported(name, torch_ref)
    x = random_images()
    logits, feats = jit_features(model, x)
    with torch.no_grad():
        ref_logits, ref_feats = torch_ref.forward_features(nchw(x))
    assert logits.shape == (2, NUM_CLASSES)
    assert len(feats) == len(ref_feats) == 4
    for i, (f, r) in enumerate(zip(feats, ref_feats, strict=True)):
        err = rel_l2(f, nhwc(r))
        assert err < TOL, f"{name} stage {i + 1}: relative L2 {err:.2e}"
    err = rel_l2(logits, ref_logits.numpy())
    assert err < TOL, f"{name} logits: relative L2 {err:.2e}"


BLOCKS = [(BasicBlock, TorchBasicBlock), (Bottleneck, TorchBottleneck)]


@pytest.mark.parametrize("attention", [None, *ATTENTION])
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: b[0].__name__)
def test_block_with_each_preset_matches_pytorch(blocks, attention):
    flax_cls, torch_cls = blocks
    layout = "timm" if attention in ("se_timm", "cbam_timm") else "official"
    torch.manual_seed(0)
    torch_block = torch_cls(32, 32, 2, attention)
    randomize_batchnorms_(torch_block).eval()
    block = flax_cls(32, 32, 2, attention=attention, rngs=nnx.Rngs(0))
    load_torch_state_dict(block, torch_block.state_dict(), layout=layout)
    block.eval()
    x = np.random.default_rng(1).standard_normal((2, 12, 12, 32), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(torch_block(nchw(x)))
    assert rel_l2(block(jnp.asarray(x)), expected) < TOL


def test_train_mode_forward_and_running_stats_match_pytorch():
    name = "cbam_resnet18"
    torch_ref = reference(name, NUM_CLASSES).train()
    model = ported(name, torch_ref)
    model.train()
    x = random_images()
    logits = nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x))
    ref_logits = torch_ref(nchw(x)).detach().numpy()
    assert rel_l2(logits, ref_logits) < TOL
    exported = to_torch_state_dict(model)
    for key, value in torch_ref.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert rel_l2(exported[key], value.numpy()) < TOL, key


def test_export_is_accepted_by_pytorch_and_round_trips_exactly():
    name = "se_resnet18"
    torch_ref = reference(name, NUM_CLASSES, seed=3)
    exported = to_torch_state_dict(ported(name, torch_ref))
    fresh = torch_model(name, NUM_CLASSES)
    fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    for key, value in torch_ref.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def torch_shapes(model: nnx.Module, layout: str = "official") -> dict[str, tuple[int, ...]]:
    return {k: b.torch_shape() for k, b in bindings(model, layout).items()}


def test_timm_layout_names_attention_se():
    keys = torch_shapes(abstract_model("seresnet18"), layout="timm")
    assert "layer1.0.se.fc1.weight" in keys and "layer1.0.se.fc1.bias" in keys
    assert keys["layer1.0.se.fc1.weight"] == (8, 64, 1, 1)
    assert "layer2.0.downsample.0.weight" in keys and "layer1.0.downsample.0.weight" not in keys


def test_bam_keys_sit_between_stages():
    keys = torch_shapes(abstract_model("bam_resnet18"))
    prefixes = {k.split(".")[0] for k in keys}
    assert {"bam1", "bam2", "bam3"} <= prefixes and "bam4" not in prefixes
    assert keys["bam1.channel_att.gate_c.gate_c_fc_0.weight"] == (4, 64)


def test_strict_load_names_the_keys():
    plain = torch_model("resnet18", NUM_CLASSES).state_dict()
    model = abstract_model("cbam_resnet18", num_classes=NUM_CLASSES)
    with pytest.raises(StateDictMismatchError) as info:
        load_torch_state_dict(model, plain)
    assert "missing key: layer1.0.cbam.ChannelGate.mlp.1.weight" in str(info.value)
    assert "missing key: layer4.1.cbam.SpatialGate.spatial.bn.running_var" in str(info.value)

    wrong_head = torch_model("resnet18", 7).state_dict()
    with pytest.raises(StateDictMismatchError, match=r"shape mismatch: fc.weight"):
        load_torch_state_dict(abstract_model("resnet18", num_classes=NUM_CLASSES), wrong_head)


def test_partial_load_of_a_plain_backbone_into_cbam_resnet():
    torch_ref = reference("resnet18", NUM_CLASSES)
    plain = {k: v for k, v in torch_ref.state_dict().items() if "num_batches" not in k}
    model = abstract_model("cbam_resnet18", num_classes=NUM_CLASSES)
    report = load_torch_state_dict(model, plain, strict=False)
    assert sorted(report.loaded) == sorted(plain)
    assert report.missing and all(".cbam." in k for k in report.missing)
    assert len(report.missing) == 8 * 9  # 8 blocks x (4 MLP + 1 conv + 4 BatchNorm tensors)
    assert not report.unexpected and not report.mismatched
    conv = bindings(model, "official")["layer3.1.conv2.weight"]
    loaded = conv.transform.to_torch(np.asarray(conv.variable.get_value()))
    np.testing.assert_array_equal(loaded, plain["layer3.1.conv2.weight"].numpy())


def test_list_counts_an_unrecorded_model_on_an_abstract_build(monkeypatch, capsys):
    spec = ModelSpec("tiny_resnet", BasicBlock, (1, 1), "t", "official", {"attention": "se"})
    monkeypatch.setitem(MODELS, spec.name, spec)
    assert spec.params is None
    assert main(["list", "tiny"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[0] == "tiny_resnet" and row[3] == f"{count_params(abstract_model(spec.name)):,}"


def test_registry_lists_required_names_and_rejects_unknown():
    names = list_models()
    for depth in (18, 34, 50, 101, 152):
        assert {f"resnet{depth}", f"se_resnet{depth}", f"seresnet{depth}"} <= set(names)
    for depth in (18, 34, 50, 101):
        assert {f"cbam_resnet{depth}", f"bam_resnet{depth}"} <= set(names)
    assert {"epsanet50_small", "epsanet101_small"} <= set(names)
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnet51", rngs=nnx.Rngs(0))
    assert get_spec("seresnet50").layout == "timm"
    assert get_spec("cbam_resnet50").source == "Jongchan"


def test_attention_argument_forms():
    assert set(ATTENTION_PRESETS) >= {"se", "se_timm", "cbam", "cbam_timm"}
    with pytest.raises(ValueError, match="attention"):
        BasicBlock(64, 64, attention="eca", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention"):
        BasicBlock(64, 64, attention=3, rngs=nnx.Rngs(0))

    def factory(channels, *, rngs, dtype, param_dtype):
        return nnx.Linear(channels, channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    block = nnx.eval_shape(lambda: Bottleneck(64, 16, attention=factory, rngs=nnx.Rngs(0)))
    assert block.attention.in_features == 64
    assert block.downsample is None  # 64 == 16 * 4 at stride 1


@pytest.mark.parametrize("value", ["auto", "xla", "pallas"])
def test_the_removed_impl_argument_is_refused_in_one_line(value):
    """`impl` chose between gate kernels that all ran XLA; naming it now is an error that says
    so, whatever its value."""
    with pytest.raises(ValueError, match=r"^model argument 'impl' was removed") as err:
        create_model("seresnet18", impl=value, rngs=nnx.Rngs(0))
    assert "\n" not in str(err.value)


def test_a_training_config_naming_impl_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    from flax_attention import data
    from flax_attention.cli.train import main as train_main

    data.build_digits(tmp_path / "tfds")
    capsys.readouterr()  # the dataset builder's progress
    config = tmp_path / "old.yaml"
    workdir = tmp_path / "run"
    config.write_text(f"dataset: digits\nworkdir: {workdir}\nmodel_kwargs: {{impl: auto}}\n")
    argv = ["--config", str(config), "--data-dir", str(tmp_path / "tfds"), "--no-progress"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model argument 'impl' was removed") and err.count("\n") == 1
    assert not workdir.exists()


def test_a_model_folder_saved_with_impl_still_restores(tmp_path):
    """Model folders saved while `impl` existed record it in `constructor_args`; restoring
    leaves it out and gives the saved model."""
    model = create_model("resnet18", num_classes=3, rngs=nnx.Rngs(0))
    model.eval()
    checkpoint.save(model, tmp_path / "model", name="resnet18", constructor_args={"num_classes": 3})
    meta_file = tmp_path / "model" / checkpoint.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    meta["constructor_args"]["impl"] = "auto"
    meta_file.write_text(json.dumps(meta))
    restored = checkpoint.restore(None, tmp_path / "model")
    np.testing.assert_array_equal(restored.fc.kernel[...], model.fc.kernel[...])


def test_bad_constructor_arguments_and_inputs():
    with pytest.raises(ValueError, match="stride"):
        EPSABlock(64, 16, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0, rngs=nnx.Rngs(0))
    model = abstract_model("resnet18")
    with pytest.raises(ValueError, match="NCHW"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="rank-4"):
        model(jnp.zeros((3, 32, 32)))


def test_bfloat16_compute_keeps_float32_params():
    model = abstract_model("resnet18", num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    model.eval()
    assert model.fc.kernel.get_value().dtype == jnp.float32
    logits = nnx.eval_shape(lambda m, v: m(v), model, jnp.zeros((1, 32, 32, 3)))
    assert logits.dtype == jnp.bfloat16 and logits.shape == (1, NUM_CLASSES)
