"""The training loop: build, resume, train with periodic logging/eval/checkpoints, evaluate, save.

Files under `config.workdir` (written by process 0 only, except the orbax checkpoints):
`metrics.jsonl` (one JSON object per logged step: step, epoch, loss, top1, top5, lr,
images_per_s; one per evaluation: step, eval_loss, eval_top1, eval_top5), `metrics.png`,
`checkpoints/<step>/` (orbax training checkpoints) and `model/` (the final model, loadable with
`flax_attention.checkpoint.restore(None, workdir / "model")`), and `.lock` while a run holds
the workdir (`workdir_lock`).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import itertools
import math
from collections import deque
from collections.abc import Callable, Generator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from flax_attention import checkpoint, data
from flax_attention.checkpoint_metadata import WEIGHT_SOURCE_ARGS
from flax_attention.errors import DISK_FULL, NOT_WRITABLE, DataFileError, first_line
from flax_attention.models import ResNet, create_model
from flax_attention.models.registry import refuse_removed_args
from flax_attention.training import run_record
from flax_attention.training.checkpointing import TrainCheckpointer, abstract_like, is_finite
from flax_attention.training.config import PRECISIONS, ConfigError, TrainConfig
from flax_attention.training.evaluate import evaluate
from flax_attention.training.interrupt import StopOnInterrupt
from flax_attention.training.metrics import Meter, MetricsLog, plot_curves
from flax_attention.training.optim import make_optimizer, make_schedule
from flax_attention.training.parallel import MeshForm, PlacedState, PmapForm, make_parallel
from flax_attention.training.state import create_train_state
from flax_attention.training.steps import eval_step, train_step
from flax_attention.training.warm_start import load_pretrained
from flax_attention.training.workdir_lock import hold_workdir

DEFAULT_WEIGHTS = "default"  # --pretrained default: the model's default Hub weights
QUEUED_STEPS = 2  # steps on the device beyond the one whose metrics the loop reads


class TrainingDivergedError(RuntimeError):
    """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


class TrainingInterruptedError(RuntimeError):
    """Ctrl-C stopped the run after saving a checkpoint of the last completed step."""


def build_model(
    name: str,
    *,
    num_classes: int,
    seed: int,
    dtype: Any = jnp.float32,
    pretrained: str | None = None,
    **kw: Any,
) -> nnx.Module:
    """`create_model(name, ...)` with `nnx.Rngs(seed)` (its initialisers sample on the host:
    no compilation), then filled with the weights of `pretrained` if given: a saved model
    directory, a weights file, `hf-hub:ORG/REPO[/FILE]` or `default` (the model's default Hub
    weights); a classifier of another class count keeps its initialisation. A source that is
    missing or does not fit the model raises `ConfigError`, one line naming it."""
    model = create_model(name, num_classes=num_classes, rngs=nnx.Rngs(seed), dtype=dtype, **kw)
    if pretrained is not None:
        source = True if pretrained == DEFAULT_WEIGHTS else pretrained
        try:
            load_pretrained(model, name, source)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"pretrained: {str(err).splitlines()[0].rstrip(':')}") from None
    return model


def _refuse_weight_sources(model_kwargs: dict[str, Any]) -> None:
    """`ConfigError` if `model_kwargs` names weights to load: that is the `pretrained` key
    (the final model's metadata records `model_kwargs`, and restoring reads no other weights)."""
    named = sorted(WEIGHT_SOURCE_ARGS & model_kwargs.keys())
    if named:
        raise ConfigError(
            f"model_kwargs: {named[0]!r} is not a model argument here; use the config key "
            "pretrained (--pretrained SOURCE) to start from other weights"
        )


def fit(config: TrainConfig) -> dict[str, Any]:
    """Train as `config` says, resuming from `config.workdir` if asked; returns the final
    evaluation ({"eval_loss", "eval_top1", "eval_top5"}) with "step", "model_dir", "plot".

    Raises `data.DatasetNotFoundError` (dataset not prepared), `TrainingDivergedError` (NaN/inf)
    and `TrainingInterruptedError` (Ctrl-C, after saving a checkpoint); before any data is read,
    `WorkdirLockedError` (another run holds the workdir) and `FileExistsError` (a `model/` or
    `metrics.jsonl` in the workdir that this run would replace but did not write).

    With GPU or hybrid decoding, the first JAX use of the GPU should happen in here: the
    decoder's process setup (`data.prepare_decoding`) sets CUDA's queue count, which only
    applies to a CUDA context created after it.
    """
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    config.validate()  # before the workdir is made for its lock
    data.prepare_decoding(config.decoder, config.dataset)  # before JAX: the lock asks jax
    with hold_workdir(config.workdir):
        return _Run(config).train()


class _Run:
    """One training run's objects, built from a config; `train()` runs it."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()  # before any data or model is touched (fields may have been reassigned)
        self.workdir = Path(cfg.workdir).absolute()
        _check_outputs_are_ours(self.workdir)
        self.spec = data.get_spec(cfg.dataset)
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.decoder = _decoder(cfg)  # before any data is read
        for note in self.decoder.notes(cfg.num_workers):
            self._print(note)
        train_size = len(_readable_source(cfg, self.spec.train_split))
        _readable_source(cfg, self.spec.eval_split)
        self.form = make_parallel(
            cfg.parallel, grad_sync=cfg.grad_sync, bn_group_size=cfg.bn_group_size
        )
        self.local_batch = _local_batch(cfg.batch_size, self.form)
        # GPU decoding: each device decodes the rows it trains on; pmap's batches are split
        # over the devices after decoding (evaluation runs in the mesh form).
        self.decode_sharding = None if isinstance(self.form, PmapForm) else self.form.sharded
        # The devices whose blocks of each local batch are decoded apart (hybrid: CPU rows in each).
        self.decode_devices = (
            len(self.decode_sharding.addressable_devices) if self.decode_sharding else 1
        )
        try:
            self.decoder.check_batch(self.local_batch, self.decode_devices)
        except ValueError as err:
            raise ConfigError(
                f"batch_size {cfg.batch_size} with --decoder {cfg.decoder}: {err}"
            ) from None
        self.local_eval_batch = _local_batch(cfg.eval_batch_size or cfg.batch_size, self.form)
        self.steps_per_epoch = max(train_size // cfg.batch_size, 1)
        self.cfg = cfg = cfg.in_steps(self.steps_per_epoch)  # the run's length and intervals
        self.total_steps = cfg.steps

        _refuse_weight_sources(cfg.model_kwargs)
        self.model_args = {
            "num_classes": self.spec.num_classes,
            "in_channels": self.spec.channels,
            **cfg.model_kwargs,
        }
        _check_model_kwargs(cfg.model_kwargs)
        with _model_kwargs_blamed(cfg.model_kwargs):
            model = build_model(
                cfg.model,
                seed=cfg.seed,
                dtype=PRECISIONS[cfg.precision],
                pretrained=None if self._resuming() else cfg.pretrained,
                **self.model_args,
            )
        self.form.prepare_model(model)
        self.schedule = make_schedule(
            cfg.schedule, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=self.total_steps
        )
        # The logged learning rate of every step, computed once on the host: reading it from a
        # program run at log time would wait for the steps queued on the device (and an eager
        # schedule compiles its jnp ops at the first log, mid-run).
        self.learning_rates = _on_host(jax.vmap(self.schedule), np.arange(self.total_steps))
        tx = make_optimizer(
            cfg.optimizer,
            self.schedule,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )
        self.graphdef, state = create_train_state(model, tx)
        self.state = jax.device_put(state, self.form.replicated)  # canonical
        normalization = {"mean": self.spec.mean, "std": self.spec.std}
        self.train_fn = self.form.compile_train(
            partial(
                train_step,
                self.graphdef,
                tx,
                label_smoothing=cfg.label_smoothing,
                **normalization,
            )
        )
        self.eval_fn = self.form.compile_eval(partial(eval_step, self.graphdef, **normalization))
        self.batches_read = 0  # the data position: training batches consumed
        self.checkpoints = TrainCheckpointer(
            self.workdir / "checkpoints",
            max_to_keep=cfg.keep_checkpoints,
            run={"model": cfg.model, "dataset": cfg.dataset, "optimizer": cfg.optimizer},
        )
        self.log = MetricsLog(self.workdir / "metrics.jsonl", enabled=self.is_main)
        self.saved_step: int | None = None

    def _resuming(self) -> bool:
        """Whether the run will continue from checkpoints in its workdir (not from the
        pretrained weights), read before anything is written."""
        directory = self.workdir / "checkpoints"
        return (
            self.cfg.resume
            and directory.is_dir()
            and any(path.name.isdigit() for path in directory.iterdir())
        )

    def _make_loader(self) -> Any:
        """The training loader from batch `batches_read` on."""
        cfg = self.cfg
        return data.make_loader(
            cfg.dataset,
            train=True,
            batch_size=self.local_batch,
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            decoder=self.decoder,
            devices=self.decode_devices,
            start=self.batches_read,
        )

    def restore(self) -> None:
        """Continue from the newest readable checkpoint (train state and data position), once
        this run's trajectory config agrees with the one recorded in the workdir
        (`run_record.check_resume`). With none, start at step 0 and drop any metrics records of
        a run that left no checkpoint. Then (re)write the workdir's run record."""
        existing = self.checkpoints.latest_step()
        if not self.cfg.resume and existing is not None:
            raise FileExistsError(
                f"--no-resume but {self.checkpoints.directory} holds checkpoints (newest: "
                f"step {existing}); choose a fresh --workdir or delete that directory"
            )
        record = run_record.trajectory_record(
            self.cfg, image_size=self.cfg.image_size or self.spec.image_size
        )
        if existing is not None:
            for note in run_record.check_resume(self.workdir, record, existing):
                self._print(note)
        restored = self.checkpoints.restore_latest(abstract_like(self.state))
        if self.is_main:
            run_record.write_record(self.workdir, record)
        if restored is None:
            self.log.truncate_after(0)
            return
        self.state, data_state, step = restored
        self.batches_read = _batches_read(data_state)
        self.log.truncate_after(step)
        self.saved_step = step
        self._print(f"resumed from {self.checkpoints.directory / str(step)}")

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.restore()
        step = int(self.state.step)
        dev_state = self.form.put_state(self.state)
        data_state = {"next_index": self.batches_read}
        loader = self._make_loader()  # after restore: from the checkpoint's data position
        # Each device batch comes with the loader position after it: what a checkpoint records.
        batches = data.prefetch_to_device(
            _with_positions(loader, self.batches_read),
            self.decoder.input_to_device(
                self.form.put_batch, cfg.image_size or self.spec.image_size, self.decode_sharding
            ),
            size=max(2, self.decoder.threads),
            threads=self.decoder.threads,
        )
        meter, in_flight = Meter(), deque()
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=f"{cfg.model} on {cfg.dataset}",
            disable=not (self.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        with (
            StopOnInterrupt() as interrupt,
            _closing(batches, loader, self.checkpoints),
            _collector_off_the_steps() as freeze_new_objects,
        ):
            first_step = step
            while step < self.total_steps and not interrupt.requested:
                batch, data_state = next(batches)
                dev_state, metrics = self.train_fn(dev_state, batch)
                step += 1
                if step == first_step + 1:  # what tracing and compiling the step left alive
                    freeze_new_objects()
                bar.update(1)
                # The metrics of the step `QUEUED_STEPS` back, and its log record if one is due:
                # reading them waits for that step only, the device is busy with the later ones.
                in_flight.append((step, metrics))
                if len(in_flight) > QUEUED_STEPS:
                    self._settle(in_flight.popleft(), meter, bar)
                evaluating = (
                    bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < self.total_steps
                )
                saving = step % cfg.checkpoint_every == 0
                if evaluating or saving:
                    self._settle_all(in_flight, meter, bar)
                if evaluating:
                    self._evaluate(step, dev_state)
                if saving:
                    self._save(step, dev_state, data_state)
                if evaluating or saving:
                    gc.collect()  # in full, where the device waits anyway
            self._settle_all(in_flight, meter, bar)
            bar.close()
            self._save(step, dev_state, data_state)
            self.checkpoints.wait()
            if interrupt.requested:
                raise TrainingInterruptedError(
                    f"interrupted at step {step}; checkpoint saved in {self.checkpoints.directory}"
                    "; run the same command again to resume"
                )
        result = self._evaluate(step, dev_state)
        result.update(step=step, **self._finish(dev_state))
        self.checkpoints.close()
        return result

    def _settle(self, done: tuple[int, dict], meter: Meter, bar: tqdm) -> None:
        """Check the metrics of step `done` (waiting for it), then write the training log
        record due after it, if any."""
        self._check(done, meter)
        step = done[0]
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self._log_train(step, meter, bar)

    def _settle_all(self, in_flight: deque[tuple[int, dict]], meter: Meter, bar: tqdm) -> None:
        """Settle every step in `in_flight`, oldest first, leaving it empty."""
        while in_flight:
            self._settle(in_flight.popleft(), meter, bar)

    def _check(self, done: tuple[int, dict], meter: Meter) -> None:
        """Fetch one step's metrics; stop on a NaN/inf loss."""
        step, metrics = done
        values = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            self.checkpoints.wait()
            raise TrainingDivergedError(
                f"loss is {values['loss']} at step {step}: training diverged and was stopped. "
                f"Last good checkpoint: {self._last_checkpoint()}. Lower --lr or add warm-up."
            )
        meter.update(values, self.cfg.batch_size)

    def _save(self, step: int, dev_state: PlacedState, data_state: dict) -> None:
        """Checkpoint step `step` (its loss already checked) if its parameters are finite."""
        if step == self.saved_step:
            return
        state = self.form.canonical_state(dev_state)
        if not is_finite((state.params, state.batch_stats)):
            self.checkpoints.wait()
            raise TrainingDivergedError(
                f"parameters are NaN/inf at step {step}: training diverged and was stopped. "
                f"Last good checkpoint: {self._last_checkpoint()}. Lower --lr or add warm-up."
            )
        self.checkpoints.save(step, state, data_state)
        self.saved_step = step

    def _last_checkpoint(self) -> str:
        if self.saved_step is None:
            return "none"
        return str(self.checkpoints.directory / str(self.saved_step))

    def _log_train(self, step: int, meter: Meter, bar: tqdm) -> None:
        if meter.steps == 0:
            return
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 3), **meter.summary()}
        record["lr"] = float(self.learning_rates[step - 1])
        self.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", top1=f"{record['top1']:.3f}")
        gc.collect(1)  # the young generations, while the device runs the queued steps

    def _evaluate(self, step: int, dev_state: PlacedState) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole evaluation split, logged to metrics.jsonl."""
        result = evaluate(
            self.eval_fn,
            self.form.canonical_state(dev_state),
            self.cfg.dataset,
            local_batch=self.local_eval_batch,
            data_dir=self.cfg.data_dir,
            image_size=self.cfg.image_size,
            progress=self.cfg.progress,
            decoder=self.decoder,
            sharding=self.form.sharded,
        )
        self.log.write({"step": step, **result})
        return result

    def _finish(self, dev_state: PlacedState) -> dict[str, str]:
        """Save the final model and the plot (process 0)."""
        model_dir, plot = self.workdir / "model", self.workdir / "metrics.png"
        if self.is_main:
            state = jax.device_get(self.form.canonical_state(dev_state))
            model = nnx.merge(self.graphdef, state.params, state.batch_stats)
            model.eval()
            checkpoint.save(
                model,
                model_dir,
                name=self.cfg.model,
                constructor_args=self.model_args,
                dataset=self.cfg.dataset,
                image_size=self.cfg.image_size or self.spec.image_size,
                overwrite=True,
            )
            plot_curves(self.log.records(), plot, title=f"{self.cfg.model} on {self.cfg.dataset}")
        return {"model_dir": str(model_dir), "plot": str(plot)}

    def _print(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text)


def _check_outputs_are_ours(workdir: Path) -> None:
    """Refuse (`FileExistsError` naming the path) a `model/` that is not a model checkpoint,
    and a fresh run's `metrics.jsonl` holding records: with no `checkpoints/`, no run of ours
    wrote them (a run makes `checkpoints/` before its first record)."""
    checkpoint.check_replaceable(workdir / "model")
    if not (workdir / "checkpoints").exists():
        MetricsLog(workdir / "metrics.jsonl").check_empty()


@contextlib.contextmanager
def _closing(batches: Generator, loader: Any, checkpoints: TrainCheckpointer) -> Iterator[None]:
    """However the training loop ends (an error too): stop the prefetch thread, let the
    checkpoint being written finish (nothing saved is lost), stop the loader's worker processes
    (freeing their shared memory)."""
    try:
        yield
    finally:
        batches.close()
        checkpoints.wait()
        close = getattr(loader, "close", None)  # a loader with worker processes
        if close is not None:
            close()


@contextlib.contextmanager
def _collector_off_the_steps() -> Iterator[Callable[[], None]]:
    """Inside: no garbage collection starts by itself (the collector's first threshold is 0;
    `gc.disable` would not hold: CuPy's allocator, in the GPU decoding threads, switches the
    collector off and back on around its own locks), and full collections skip every object
    alive on entry (`gc.freeze`) and those alive when the callable it yields is called (after
    the first step: its trace and compile leave about 80,000 objects alive for a ResNet-50).
    The loop collects itself where the device has queued work or waits anyway: the young
    generations after each training log record, everything after a checkpoint or an
    evaluation. The exit restores the thresholds and unfreezes.

    A full collection holds the interpreter for as long as it walks every object it tracks
    (the model, optimizer, compiled steps, loaders, decoders and libraries: hundreds of
    thousands), while the accelerator runs out of queued work; started by the collector it
    came every few dozen steps, at any step. Objects are still freed when their last reference
    goes; only reference cycles wait for the loop's next collection. Objects frozen before
    entry (a caller's; CPython 3.12 freezes a few hundred of its own at startup) stay frozen and
    the loop freezes nothing more then; the callable collects the young generations instead, so
    the first step's leftovers are walked there once, not at the first log record."""
    thresholds = gc.get_threshold()
    freezing = not gc.get_freeze_count()

    def freeze() -> None:
        if freezing:
            gc.collect()
            gc.freeze()
        else:
            gc.collect(1)

    freeze()
    gc.set_threshold(0, *thresholds[1:])
    try:
        yield freeze
    finally:
        gc.set_threshold(*thresholds)
        if freezing:
            gc.unfreeze()


def _on_host(fn: Callable[..., jax.Array], *args: Any) -> np.ndarray:
    """`fn(*args)` computed by one compiled program on this host's CPU, as a numpy array."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(jax.jit(fn)(*args))


def _with_positions(loader: Any, start: int) -> Iterator[tuple[dict, dict]]:
    """(batch, data position after it) for the endless training loader that starts at batch
    `start`: {"next_index": batches consumed}, the same whatever the number of workers."""
    for position in itertools.count(start + 1):
        yield next(loader), {"next_index": position}


def _batches_read(data_state: dict) -> int:
    """The batches consumed that a checkpoint's data state records. Checkpoints store
    {"next_index": k}; one written by a loader with worker processes (before this format)
    holds grain's per-worker positions, whose sum is k."""
    if "next_index" in data_state:
        return int(data_state["next_index"])
    workers = data_state.get("iterators_in_use_states")
    if workers and all("next_index" in w for w in workers):
        return sum(int(w["next_index"]) for w in workers)
    raise ValueError(f"unrecognised data position in the checkpoint: {data_state}")


def _local_batch(global_batch: int, form: MeshForm) -> int:
    """This process's rows of a global batch; checks it splits evenly over devices."""
    if global_batch % form.num_devices:
        raise ConfigError(
            f"batch size {global_batch} does not split evenly over {form.num_devices} devices"
        )
    return global_batch // jax.process_count()


def _decoder(cfg: TrainConfig) -> data.Decoder:
    """`--decoder` resolved for this run; `ConfigError` if it cannot be used here."""
    try:
        return data.choose_decoder(
            cfg.decoder,
            cfg.dataset,
            threads=cfg.decode_threads,
            cpu_share=cfg.hybrid_cpu_share,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _readable_source(cfg: TrainConfig, split: str) -> Any:
    """The data source of `split`, its first and last records read: `DataFileError` naming the
    split's files if they are corrupt or truncated."""
    try:
        source = data.data_source(cfg.dataset, split, cfg.data_dir)
        for index in sorted({0, len(source) - 1}) if len(source) else []:
            source[index]
    except data.DatasetNotFoundError:
        raise
    except (RuntimeError, ValueError, OSError) as err:
        if isinstance(err, OSError) and err.errno in NOT_WRITABLE | DISK_FULL:
            raise  # preparing an embedded dataset where it cannot be written: named as such
        folder = Path(cfg.data_dir or data.default_data_dir()).expanduser()
        tfds_name = data.get_spec(cfg.dataset).tfds_name
        raise DataFileError(
            f"the {split!r} data files of {cfg.dataset!r} under {folder / tfds_name} cannot be "
            f"read ({first_line(err)}); prepare the dataset again"
        ) from None
    return source


def _check_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    """`ConfigError` naming the `model_kwargs` keys that no model constructor takes, or one
    that was removed (`REMOVED_ARGS`, with why)."""
    try:
        refuse_removed_args(model_kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    known = set(inspect.signature(ResNet.__init__).parameters)
    known |= set(inspect.signature(create_model).parameters)
    known -= {"self", "name", "block", "layers", "rngs", "dtype", "kw"}  # the run's own
    unknown = sorted(set(model_kwargs) - known)
    if unknown:
        raise ConfigError(f"model_kwargs: unknown keys {unknown}; known keys: {sorted(known)}")


@contextlib.contextmanager
def _model_kwargs_blamed(model_kwargs: dict[str, Any]) -> Iterator[None]:
    """A ValueError or TypeError building a model given `model_kwargs` (a bad value of one of
    them) as a `ConfigError` naming them; without any, the error is left as it is (a bug)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        if not model_kwargs:
            raise
        raise ConfigError(f"model_kwargs {model_kwargs}: {first_line(err)}") from None
