"""Training: parallel forms agree, SGD matches PyTorch, resume is exact, the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from functools import partial
from unittest.mock import ANY

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx, struct
from parity import assert_close

from flax_attention import checkpoint, cli, data
from flax_attention.convert import load_torch_state_dict, to_torch_state_dict
from flax_attention.errors import RunFileError
from flax_attention.models import MODELS, BasicBlock, ModelSpec, ResNet
from flax_attention.reference.models import TorchBasicBlock, TorchResNet, randomize_batchnorms_
from flax_attention.training import (
    ConfigError,
    TrainCheckpointer,
    TrainConfig,
    TrainState,
    create_train_state,
    cross_entropy,
    decay_mask,
    fit,
    make_optimizer,
    make_parallel,
    make_schedule,
    merge_model,
    train_step,
)
from flax_attention.training.checkpointing import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    abstract_like,
)
from flax_attention.training.collectives import count_collectives
from flax_attention.training.metrics import MetricsLog

MAKE_LOADER = data.make_loader
TINY = "tiny_se_resnet"  # one SE BasicBlock stage: fast to compile and run on CPU


pytestmark = pytest.mark.usefixtures("tiny_model")


def tiny_resnet(in_channels: int = 1, seed: int = 0) -> ResNet:
    def build():
        return ResNet(
            BasicBlock,
            [1],
            num_classes=10,
            in_channels=in_channels,
            attention="se",
            rngs=nnx.Rngs(seed),
        )

    return nnx.jit(build)()


def train_main(argv: list[str]) -> int:
    """`flax-attention train ARGV`: the training program as the one program's subcommand."""
    return cli.main(["train", *argv])


def run_steps(form_name: str, tx, batches, in_channels: int = 1, model=None, **options):
    """The canonical state (on host) after one step per batch in parallel form `form_name`
    (made with `options`: grad_sync, bn_group_size)."""
    form = make_parallel(form_name, **options)
    model = model if model is not None else tiny_resnet(in_channels)
    form.prepare_model(model)
    graphdef, state = create_train_state(model, tx)
    dev = form.put_state(jax.device_put(state, form.replicated))
    step = form.compile_train(partial(train_step, graphdef, tx))
    for batch in batches:
        dev, _ = step(dev, form.put_batch(batch))
    return graphdef, jax.device_get(form.canonical_state(dev))


def random_batches(n: int, batch: int = 16, size: int = 16, channels: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.standard_normal((batch, size, size, channels)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
        }
        for _ in range(n)
    ]


def flat(tree) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_states_close(got, want, what: str, steps: int) -> None:
    assert int(got.step) == steps
    for part in ("params", "batch_stats", "opt_state"):
        want_leaves, got_leaves = flat(getattr(want, part)), flat(getattr(got, part))
        assert want_leaves.keys() == got_leaves.keys()
        for key, value in want_leaves.items():
            np.testing.assert_allclose(
                got_leaves[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{what} {part}{key}"
            )


def test_parallel_forms_agree():
    """jit (shard_map) and pmap on 8 devices, gradients averaged after or during the backward,
    give the one-device step's parameters, BatchNorm statistics and optimizer state."""
    assert jax.device_count() == 8
    tx = make_optimizer("sgd", 0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    batches = random_batches(3)
    ref = run_steps("none", tx, batches)[1]
    moved = flat(ref.params)
    init = flat(nnx.state(tiny_resnet(), nnx.Param))
    assert any(not np.allclose(moved[k], init[k]) for k in moved), "the steps changed nothing"
    for name in ("jit", "pmap"):
        for grad_sync in ("end", "flat", "backward"):
            got = run_steps(name, tx, batches, grad_sync=grad_sync)[1]
            assert_states_close(got, ref, f"{name} grad_sync={grad_sync}", 3)


def test_batchnorm_groups_equal_independent_groups():
    """bn_group_size=2 on 8 devices: each group of 2 devices (4 rows) normalises with its own
    statistics, as 4 independent one-device steps do; gradients (hence SGD's new state) and
    the running statistics are the mean over the groups."""
    tx = make_optimizer("sgd", 0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    batches = random_batches(2)
    got = run_steps("jit", tx, batches, bn_group_size=2)[1]

    model = tiny_resnet()
    graphdef, state = create_train_state(model, tx)
    one_device = jax.jit(partial(train_step, graphdef, tx))
    mean_of_groups = lambda *leaves: (  # noqa: E731
        np.mean(leaves, 0) if np.issubdtype(leaves[0].dtype, np.floating) else leaves[0]
    )
    for batch in batches:
        groups = [{k: v[4 * g : 4 * g + 4] for k, v in batch.items()} for g in range(4)]
        states = [jax.device_get(one_device(state, group)[0]) for group in groups]
        state = jax.tree.map(mean_of_groups, *states)
    assert_states_close(got, state, "bn_group_size=2", 2)
    global_bn = run_steps("none", tx, batches)[1]
    group_means, global_means = flat(got.batch_stats), flat(global_bn.batch_stats)
    assert any(not np.allclose(group_means[k], global_means[k]) for k in group_means)


@pytest.mark.parametrize("grad_sync", ["end", "flat"])
def test_jit_step_has_one_collective_per_batchnorm_each_way(grad_sync: str):
    """The jit (shard_map) step: an all-gather per BatchNorm forward, an all-reduce per
    BatchNorm backward and one for the gradients and metrics ("flat": of one float32 vector
    of every parameter and the 3 metrics)."""
    tx = make_optimizer("sgd", 0.1, momentum=0.9)
    form = make_parallel("jit", grad_sync=grad_sync)
    model = tiny_resnet()
    form.prepare_model(model)
    batch_norms = sum(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(model))
    graphdef, state = create_train_state(model, tx)
    step = form.compile_train(partial(train_step, graphdef, tx))
    lowered = step.lower(form.put_state(state), form.put_batch(random_batches(1)[0]))
    hlo = lowered.compile().as_text()
    counts = count_collectives(hlo)
    assert counts == {"all-gather": batch_norms, "all-reduce": batch_norms + 1, "total": ANY}
    if grad_sync == "flat":
        size = sum(leaf.size for leaf in jax.tree.leaves(state.params)) + 3
        assert re.search(rf"= f32\[{size}\]\S* all-reduce\(", hlo), "no flat all-reduce"


@pytest.mark.parametrize("form_name", ["none", "pmap"])
def test_the_placed_state_is_one_pytree_node_over_the_arrays(form_name: str):
    """A form's placed state is one node over the state's arrays (a step call then flattens and
    rebuilds it in one Python call, not one per `nnx.Variable`); the canonical state it gives
    back is the state put in."""
    form = make_parallel(form_name)
    _, state = create_train_state(tiny_resnet(), make_optimizer("sgd", 0.1, momentum=0.9))
    placed = form.put_state(state)
    tree = jax.tree.structure(placed)
    assert tree.num_leaves == len(jax.tree.leaves(state))
    assert tree.num_nodes == tree.num_leaves + 1
    back = form.canonical_state(placed)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_form_options_are_config_errors():
    with pytest.raises(ConfigError, match="bn_group_size must divide the number of devices, 8"):
        make_parallel("jit", bn_group_size=3)
    with pytest.raises(ConfigError, match="bn_group_size needs parallel 'jit'"):
        make_parallel("pmap", bn_group_size=2)
    with pytest.raises(ConfigError, match="grad_sync"):
        make_parallel("jit", grad_sync="sometimes")


def test_two_sgd_steps_match_pytorch():
    torch.manual_seed(0)
    ref = randomize_batchnorms_(TorchResNet(TorchBasicBlock, [1], num_classes=10, attention="se"))
    model = tiny_resnet(in_channels=3)
    load_torch_state_dict(model, ref.state_dict(), layout="official")
    batches = random_batches(2, batch=8, size=16, channels=3, seed=1)

    lr = 0.05
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    ref.train()
    for batch in batches:
        opt.zero_grad()
        x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
        loss = F.cross_entropy(ref(x), torch.from_numpy(batch["label"]).long())
        loss.backward()
        opt.step()

    tx = make_optimizer("sgd", lr, weight_decay=0.0, momentum=0.9, nesterov=False)
    graphdef, state = run_steps("none", tx, batches, model=model)
    ours = to_torch_state_dict(merge_model(graphdef, state, train=False), layout="official")
    theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    for key, want in theirs.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert_close(ours[key], want, key)


def test_label_smoothing_matches_pytorch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    want = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=0.1)
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1).mean()
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_weight_decay_only_on_kernels():
    params = nnx.state(tiny_resnet(), nnx.Param)
    mask = flat(decay_mask(params))
    assert mask and all(bool(v) == ("'kernel'" in k) for k, v in mask.items())
    assert sum(map(bool, mask.values())) == 6  # stem, 2 block convs, 2 SE 1x1 convs, fc


def config(data_dir, workdir, **kw) -> TrainConfig:
    values = dict(
        model=TINY,
        dataset="digits",
        data_dir=str(data_dir),
        workdir=str(workdir),
        steps=6,
        batch_size=16,
        lr=0.05,
        warmup_steps=2,
        parallel="none",
        log_every=1,
        checkpoint_every=2,
        keep_checkpoints=5,
        progress=False,
    )
    return TrainConfig(**{**values, **kw})


class RecordingLoader:
    """Wraps a grain iterator: records the labels it yields; `fail_at`-th batch raises
    (a killed run) and `nan_at`-th batch is all NaN."""

    def __init__(self, inner, seen: list, fail_at=None, nan_at=None):
        self.inner, self.seen, self.fail_at, self.nan_at = inner, seen, fail_at, nan_at
        self.count = 0

    def __next__(self):
        self.count += 1
        if self.count == self.fail_at:
            raise RuntimeError("killed")
        batch = next(self.inner)
        self.seen.append(batch["label"].tolist())
        if self.count == self.nan_at:
            batch = {**batch, "image": np.full(batch["image"].shape, np.nan, np.float32)}
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def patch_loader(monkeypatch, seen, **kw):
    monkeypatch.setattr(
        data, "make_loader", lambda *a, **k: RecordingLoader(MAKE_LOADER(*a, **k), seen, **kw)
    )


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            MODELS, TINY, ModelSpec(TINY, BasicBlock, (1,), "t", "official", {"attention": "se"})
        )
        patch_loader(mp, seen)
        result = fit(config(data_dir, workdir))
    return workdir, seen, result


def test_resume_after_kill_is_exact(data_dir, tmp_path, monkeypatch, uninterrupted):
    ref_dir, ref_seen, ref_result = uninterrupted
    seen = []
    patch_loader(monkeypatch, seen, fail_at=6)  # dies fetching step 6's batch; newest ckpt 4
    with pytest.raises(RuntimeError, match="killed"):
        fit(config(data_dir, tmp_path))
    assert len(seen) == 5
    seen_before = list(seen)
    seen.clear()
    patch_loader(monkeypatch, seen)
    result = fit(config(data_dir, tmp_path))

    # The data position came back with the state: the resumed run trains on batches 5 and 6.
    # (Both runs' loaders read up to two batches past the last step: the device prefetch.)
    assert len(ref_seen) >= 6 and len(seen) >= 2
    assert seen_before[:4] + seen[:2] == ref_seen[:6]
    assert result == {**ref_result, "model_dir": result["model_dir"], "plot": result["plot"]}
    want = flat(nnx.state(checkpoint.restore(None, ref_dir / "model")))
    got = flat(nnx.state(checkpoint.restore(None, tmp_path / "model")))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_other_workers_continues_with_the_same_batches(
    data_dir, tmp_path, monkeypatch, uninterrupted
):
    """Killed with the loader in this process, resumed with 2 worker processes: the data
    position is the batches consumed, so the run finishes as the uninterrupted one."""
    ref_dir, ref_seen, ref_result = uninterrupted
    seen = []
    patch_loader(monkeypatch, seen, fail_at=6)
    with pytest.raises(RuntimeError, match="killed"):
        fit(config(data_dir, tmp_path))
    seen_before = list(seen)
    seen.clear()
    patch_loader(monkeypatch, seen)
    result = fit(config(data_dir, tmp_path, num_workers=2))
    assert seen_before[:4] + seen[:2] == ref_seen[:6]
    assert result == {**ref_result, "model_dir": result["model_dir"], "plot": result["plot"]}
    want = flat(nnx.state(checkpoint.restore(None, ref_dir / "model")))
    got = flat(nnx.state(checkpoint.restore(None, tmp_path / "model")))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_checkpoints_of_worker_loaders_before_the_batch_count_still_resume(data_dir):
    """A data position saved as grain's per-worker state (checkpoints written with workers
    before positions were batch counts) reads as the batches consumed."""
    from flax_attention.training.loop import _batches_read

    loader = MAKE_LOADER("digits", train=True, batch_size=16, data_dir=data_dir, num_workers=2)
    try:
        for _ in range(5):
            next(loader)
        assert _batches_read(json.loads(json.dumps(loader.get_state()))) == 5
    finally:
        loader.close()
    assert _batches_read({"next_index": 7}) == 7
    with pytest.raises(ValueError, match="unrecognised data position"):
        _batches_read({"offset": 3})


def corrupt(step_dir) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage" * 10)


def tiny_abstract_state():
    """The abstract train state of `config()`'s runs (a schedule: optax then counts steps)."""
    tx = make_optimizer("sgd", lambda step: 0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    _, state = create_train_state(tiny_resnet(), tx)
    return abstract_like(jax.device_put(state, make_parallel("none").replicated))


def test_corrupt_latest_checkpoint_falls_back(uninterrupted, tmp_path, capsys):
    ref_dir, _, _ = uninterrupted
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints", ckpt_dir)
    corrupt(ckpt_dir / "6")
    state = tiny_abstract_state()
    manager = TrainCheckpointer(ckpt_dir)
    restored, data_state, step = manager.restore_latest(state)
    assert step == 4 and int(restored.step) == 4 and data_state
    err = capsys.readouterr().err
    assert "refusing checkpoint" in err and "corrupt" in err and f"{ckpt_dir / '6'}" in err

    # With every checkpoint unreadable nothing is moved aside: the run stops instead.
    corrupt(ckpt_dir / "2")
    corrupt(ckpt_dir / "4")
    with pytest.raises(CorruptCheckpointError, match=r"none of the checkpoints \[4, 2\]"):
        manager.restore_latest(state)
    manager.close()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2", "4", "6.corrupt"]


def test_resume_past_a_corrupt_newest_checkpoint_finishes(
    data_dir, tmp_path, uninterrupted, capsys, caplog
):
    ref_dir, _, ref_result = uninterrupted
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(ref_dir / "metrics.jsonl", tmp_path / "metrics.jsonl")
    corrupt(tmp_path / "checkpoints" / "6")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # killed while writing a record
    result = fit(config(data_dir, tmp_path))

    # Resumed from step 4 and saved step 6 again: the same run as without the fault.
    assert result == {**ref_result, "model_dir": result["model_dir"], "plot": result["plot"]}
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["2", "4", "6", "6.corrupt"]
    err = capsys.readouterr().err
    assert f"refusing checkpoint {tmp_path / 'checkpoints' / '6'}" in err
    assert f"moved the refused checkpoint aside to {tmp_path / 'checkpoints' / '6.corrupt'}" in err
    assert "dropping the partial last line" in err
    assert not [r.getMessage() for r in caplog.records if "orbax" in r.pathname]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


@struct.dataclass
class LegacyTrainState:
    """The train state as checkpoints held it while it carried an unused PRNG key."""

    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def write_legacy_checkpoint(ref_checkpoints, directory, step: int) -> None:
    """Step `step` of `ref_checkpoints` saved again as `LegacyTrainState`, through the same
    checkpointer (and so the same orbax items and metadata) the training loop uses."""
    source = directory.parent / "reference-checkpoints"
    shutil.copytree(ref_checkpoints, source)
    for newer in (p for p in source.iterdir() if int(p.name) > step):
        shutil.rmtree(newer)
    reader = TrainCheckpointer(source)
    state, data_state, restored_step = reader.restore_latest(tiny_abstract_state())
    reader.close()
    assert restored_step == step
    legacy = LegacyTrainState(**vars(state), rng=jax.random.PRNGKey(0))
    writer = TrainCheckpointer(
        directory, run={"model": TINY, "dataset": "digits", "optimizer": "sgd"}
    )
    writer.save(step, legacy, data_state)
    writer.wait()
    writer.close()


def test_a_checkpoint_with_the_legacy_rng_resumes(data_dir, tmp_path, uninterrupted, capsys):
    """A run whose checkpoints were written when the train state held `rng` resumes from them
    and finishes as the uninterrupted run; the restored state has no `rng`."""
    ref_dir, _, ref_result = uninterrupted
    assert "rng" not in {field.name for field in dataclasses.fields(TrainState)}
    write_legacy_checkpoint(ref_dir / "checkpoints", tmp_path / "checkpoints", 4)
    shutil.copy(ref_dir / "metrics.jsonl", tmp_path / "metrics.jsonl")
    restored, _, step = TrainCheckpointer(tmp_path / "checkpoints").restore_latest(
        tiny_abstract_state()
    )
    assert step == 4 and isinstance(restored, TrainState) and int(restored.step) == 4

    result = fit(config(data_dir, tmp_path))
    assert f"resumed from {tmp_path / 'checkpoints' / '4'}" in capsys.readouterr().out
    assert result == {**ref_result, "model_dir": result["model_dir"], "plot": result["plot"]}
    want = flat(nnx.state(checkpoint.restore(None, ref_dir / "model")))
    got = flat(nnx.state(checkpoint.restore(None, tmp_path / "model")))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_legacy_checkpoint_of_another_model_is_still_refused(uninterrupted, tmp_path):
    """The legacy `rng` leaf is no difference of layout; another model's arrays still are."""
    write_legacy_checkpoint(uninterrupted[0] / "checkpoints", tmp_path / "checkpoints", 4)
    tx = make_optimizer("sgd", lambda step: 0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    _, other = create_train_state(tiny_resnet(in_channels=3), tx)
    target = abstract_like(jax.device_put(other, make_parallel("none").replicated))
    with pytest.raises(CheckpointMismatchError, match="checkpoint of another model") as err:
        TrainCheckpointer(tmp_path / "checkpoints").restore_latest(target)
    assert "rng" not in str(err.value)


def test_checkpoint_of_another_optimizer_is_named(data_dir, tmp_path, uninterrupted, capsys):
    shutil.copytree(uninterrupted[0] / "checkpoints", tmp_path / "checkpoints")
    argv = ["--model", TINY, "--data-dir", str(data_dir), "--workdir", str(tmp_path)]
    argv += ["--steps", "6", "--batch-size", "16", "--parallel", "none", "--no-progress"]
    assert train_main([*argv, "--optimizer", "adamw"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert "is a checkpoint of another optimizer" in err
    assert "(optimizer sgd; this run: optimizer adamw)" in err and "corrupt" not in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_checkpoint_of_another_model_is_named(data_dir, tmp_path, uninterrupted, monkeypatch):
    other = "tiny_plain_resnet"
    monkeypatch.setitem(MODELS, other, ModelSpec(other, BasicBlock, (1,), "test", "official", {}))
    shutil.copytree(uninterrupted[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointMismatchError) as err:
        fit(config(data_dir, tmp_path, model=other))
    message = str(err.value)
    assert "is a checkpoint of another model" in message
    assert f"(model {TINY}; this run: model {other})" in message
    assert "params.stages.0.0.attention.fc1.kernel: saved float32[64, 4], this run none" in message


def test_a_logged_step_is_read_after_the_next_step_is_dispatched(data_dir, tmp_path, monkeypatch):
    """Logging step N reads its metrics only once step N + 1 is queued, so the device never
    idles while the host writes the record (it did: 40 ms every --log-every steps on an H200)."""
    from flax_attention.training import loop

    events = []
    prefetch, check = data.prefetch_to_device, loop._Run._check

    def recorded_batches(*args, **kwargs):
        for number, item in enumerate(prefetch(*args, **kwargs), start=1):
            events.append(("batch", number))  # taken right before its step is dispatched
            yield item

    def recorded_check(self, pending, meter):
        if pending is not None:
            events.append(("read", pending[0]))
        check(self, pending, meter)

    monkeypatch.setattr(data, "prefetch_to_device", recorded_batches)
    monkeypatch.setattr(loop._Run, "_check", recorded_check)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    fit(config(data_dir, tmp_path, checkpoint_every=10))
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ  # digits: never decoded on a GPU
    for step in range(1, 6):  # log_every=1: every step is logged
        assert events.index(("batch", step + 1)) < events.index(("read", step))
    records = MetricsLog(tmp_path / "metrics.jsonl").records()
    assert [r["step"] for r in records if "loss" in r and "eval_loss" not in r] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_between_the_first_step_and_the_last_the_loop_neither_compiles_nor_syncs_to_log(
    data_dir, tmp_path, monkeypatch
):
    """Between its first and its last step the loop compiles nothing and its log records read
    no array from the device: either would leave the device idle mid-run. (The logged learning
    rate was computed at log time, eagerly, which compiled 8 programs at the first log; then by
    one jitted program, whose result waited for every step queued on the device.) The logged
    rates are the schedule's."""
    import logging

    from jax._src.array import ArrayImpl

    from flax_attention.training import loop

    compiled, stamps, prefetch, save = [], [], data.prefetch_to_device, loop._Run._save
    read_while_logging, logging_now, log_train = [], [], loop._Run._log_train
    array_value = ArrayImpl._value

    class Compiles(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Compiling ") and len(stamps) >= 2:
                compiled.append(message.split(" with ")[0])

    def counted_batches(*args, **kwargs):
        for item in prefetch(*args, **kwargs):
            stamps.append(None)  # the second batch: the first step is dispatched
            yield item

    def final_save(self, *args):
        stamps.clear()  # the loop is over
        save(self, *args)

    def watched_value(array):
        if logging_now:
            read_while_logging.append(array.shape)
        return array_value.fget(array)

    def watched_log(self, *args):
        logging_now.append(None)
        try:
            log_train(self, *args)
        finally:
            logging_now.clear()

    handler = Compiles()
    logging.getLogger("jax").addHandler(handler)
    monkeypatch.setattr(data, "prefetch_to_device", counted_batches)
    monkeypatch.setattr(loop._Run, "_save", final_save)
    monkeypatch.setattr(loop._Run, "_log_train", watched_log)
    monkeypatch.setattr(ArrayImpl, "_value", property(watched_value))
    jax.clear_caches()  # programs an earlier test compiled would hide a compile here
    cfg = config(data_dir, tmp_path, steps=4, checkpoint_every=10)
    try:
        with jax.log_compiles():
            fit(cfg)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert compiled == []
    assert read_while_logging == []
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    schedule = make_schedule("cosine", lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=4)
    rates = [(r["step"], r["lr"]) for r in logged if "lr" in r]
    assert rates == [(s, pytest.approx(float(schedule(s - 1)), rel=1e-6)) for s in range(1, 5)]


def test_the_loop_runs_with_the_setup_objects_frozen(data_dir, tmp_path, monkeypatch):
    """Full garbage collections during training skip what was alive when the loop started
    and what the first step's trace and compile left alive (`gc.freeze` at both points);
    everything is unfrozen afterwards, and a caller's own freeze is kept."""
    import gc

    from flax_attention.training import loop

    frozen, check, freezes, freeze = [], loop._Run._check, [], gc.freeze

    def recorded_check(self, pending, meter):
        frozen.append(gc.get_freeze_count())
        check(self, pending, meter)

    def recorded_freeze():
        freezes.append(gc.get_freeze_count())
        freeze()

    monkeypatch.setattr(loop._Run, "_check", recorded_check)
    monkeypatch.setattr(loop.gc, "freeze", recorded_freeze)
    assert gc.get_freeze_count() == 0
    fit(config(data_dir, tmp_path / "run", steps=3))
    assert frozen and min(frozen) > 10_000  # the model, steps and libraries: many objects
    assert len(freezes) == 2 and freezes[0] == 0 and freezes[1] > 10_000  # entry, first step
    monkeypatch.setattr(loop.gc, "freeze", freeze)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's
    try:
        count = gc.get_freeze_count()
        fit(config(data_dir, tmp_path / "frozen", steps=2))
        assert 0 < gc.get_freeze_count() <= count  # neither unfrozen nor frozen further
    finally:
        gc.unfreeze()


def test_with_objects_frozen_before_it_the_loop_still_collects_the_first_steps_leftovers():
    """With objects frozen before the loop (a caller's, or CPython 3.12's own at startup) the
    loop freezes nothing, but what the first step left alive leaves the young generations
    after it: the first log record's collection of the young generations stays short."""
    import gc

    from flax_attention.training import loop

    gc.freeze()  # a caller's
    try:
        with loop._collector_off_the_steps() as after_the_first_step:
            leftovers = [[i] for i in range(20_000)]  # what a trace and compile leave alive
            after_the_first_step()
            assert gc.get_count()[0] < 100
            del leftovers
    finally:
        gc.unfreeze()


def test_the_collector_starts_nothing_by_itself_during_the_steps(data_dir, tmp_path, monkeypatch):
    """From the first step's metrics to the end of the loop no garbage collection starts by
    itself, however many long-lived objects the steps make (a full one held the interpreter
    while the device ran dry) and whoever switches the collector on; the loop collects the
    young generations after each log record and in full after each checkpoint, and the
    collector's thresholds are as before once it returns."""
    import contextlib
    import gc

    from flax_attention.training import loop

    started, explicit, kept, steps = [], [], [], []
    check, collector, collect = loop._Run._check, loop._collector_off_the_steps, gc.collect

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start" and steps:
            started.append(info["generation"])

    def long_lived_objects(self, pending, meter):
        steps.append(None)
        gc.enable()  # as CuPy's allocator does from the decoding threads, after a gc.disable
        kept.append([[] for _ in range(50_000)])  # would start collections by the dozen
        check(self, pending, meter)

    def counted_collect(generation: int = 2):
        if steps:
            explicit.append(generation)
        return collect(generation)

    @contextlib.contextmanager
    def until_the_loop_ends():
        with collector() as freeze:
            yield freeze
            steps.clear()

    monkeypatch.setattr(loop._Run, "_check", long_lived_objects)
    monkeypatch.setattr(loop, "_collector_off_the_steps", until_the_loop_ends)
    monkeypatch.setattr(gc, "collect", counted_collect)
    thresholds = gc.get_threshold()
    gc.callbacks.append(on_collection)
    try:
        fit(config(data_dir, tmp_path, steps=8, checkpoint_every=4, log_every=2))
    finally:
        gc.callbacks.remove(on_collection)
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    # Logs after steps 2, 4, 6, 8 (young), checkpoints after steps 4 and 8 (full).
    assert sorted(explicit) == [1, 1, 1, 1, 2, 2]
    assert sorted(started) == sorted(explicit)  # none by itself


def test_partial_last_metrics_line_is_dropped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    log = MetricsLog(path)
    assert [r["step"] for r in log.records()] == [1, 2]
    assert "dropping the partial last line" in capsys.readouterr().err
    log.truncate_after(2)
    log.write({"step": 3, "loss": 1.0})
    assert [json.loads(line)["step"] for line in path.open()] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunFileError, match="line 2: not a JSON record"):
        log.records()


def test_cli_end_to_end(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["--model", TINY, "--data-dir", str(data_dir), "--workdir", str(workdir)]
    argv += ["--steps", "3", "--batch-size", "16", "--log-every", "1", "--no-progress"]
    assert train_main(argv) == 0  # default parallel form: jit over the 8 simulated devices
    out = capsys.readouterr().out
    assert "final test accuracy" in out and str(workdir / "model") in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in train)
    assert any("eval_top1" in r for r in records)
    assert (workdir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = checkpoint.restore(None, workdir / "model")
    model.eval()
    assert model(jnp.zeros((2, 16, 16, 1))).shape == (2, 10)


def test_cli_nan_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    patch_loader(monkeypatch, [], nan_at=4)
    argv = ["--model", TINY, "--data-dir", str(data_dir), "--workdir", str(tmp_path)]
    argv += ["--steps", "6", "--batch-size", "16", "--checkpoint-every", "2", "--no-progress"]
    argv += ["--parallel", "none", "--log-every", "1"]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    # NaN inputs poison the BatchNorm statistics (ReLU and max pool may hide them from the loss).
    assert "NaN" in err.replace("nan", "NaN") and "at step 4" in err and "diverged" in err
    assert str(tmp_path / "checkpoints" / "2") in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert not (tmp_path / "model").exists()


def test_cli_missing_dataset(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--dataset", "cifar10", "--data-dir", str(empty), "--workdir", str(tmp_path / "w")]
    assert train_main(argv) != 0
    err = capsys.readouterr().err
    assert "cifar10" in err and "not prepared" in err and "tfds build" in err


def test_bf16_keeps_float32_parameters():
    tx = make_optimizer("sgd", 0.1, weight_decay=5e-4, momentum=0.9)
    model = nnx.jit(
        lambda: ResNet(
            BasicBlock, [1], num_classes=10, in_channels=1, rngs=nnx.Rngs(0), dtype=jnp.bfloat16
        )
    )()
    _, state = run_steps("none", tx, random_batches(1), model=model)
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
