"""A real multi-process training run, killed after a checkpoint, resumed, checked against one
process: `python -m benchmarks.lab.multiprocess [--quick] [--processes K] [--decoder D]
--out result.json`.

Every run is the training program itself (`flax_attention.cli.train.main`, `--parallel jit`)
in child processes. `--decoder cpu` (the default) trains on the embedded digits dataset
(upscaled to `--image-size`); `gpu`, `auto` and `hybrid` on a small photo-like JPEG dataset in
tfds `imagenet2012` layout (`flax_attention.data.photos`, with its odd images: CMYK, grayscale,
PNG, one large JPEG; written once under the workdir), each process's devices decoding the rows
they train on (`data.PerDeviceDecoder`, the global batch assembled across processes). K processes
with `jax.distributed.initialize` (coordinator on 127.0.0.1, a free port) each see their own
devices (GPU: `CUDA_VISIBLE_DEVICES=i`; `--quick`: CPU processes of 2 host devices each):
1. a one-process reference run on all K x d devices (GPU: one process seeing the K GPUs);
2. the K-process run, SIGKILLed as soon as its first checkpoint is committed;
3. the same K-process command again: it resumes from the newest checkpoint and finishes.
The final models' parameters and BatchNorm statistics are compared. Every device trains on
the same rows in both runs (`data.make_dataset` gives process p its contiguous block of each
global batch, the rows a one-process run puts on device p), so the runs differ only where
collectives or compiled kernels round differently across processes; the JSON says whether the
models are bitwise equal, and the check is float32 tolerance (matmuls and convolutions at
"highest" precision, no TF32; on GPUs deterministic reductions). The JSON result: steps,
images/s of each run (median of its logged intervals after the first), the checkpoint the run
was killed after and the step it resumed from, bitwise equality, the largest parameter
difference and the array furthest outside the tolerance, pass/fail.
`--quick` (tests): a one-stage SE ResNet, 16x16 images, small photos, well under a minute on 2
CPU cores. There is no GPU decoder on the CPU: with `--quick` and a decoder other than cpu, each
process replaces nvImageCodec's plan decoder by its host twin (`gpu_decode.CpuReferenceDecoder`:
the same box average and resample, on the device it is given) and takes every CPU device for a GPU, so
the whole GPU decoding path (crop plans in the loader, per-device decoding, the global array from
each process's device arrays, resume) runs; the JSON says so (`decoder_stand_in`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from benchmarks.quick_model import QUICK_MODEL, register_quick_model
from benchmarks.settings import ROOT
from benchmarks.warm import stop_processes

CPU_DEVICES_PER_PROCESS = 2
RTOL, ATOL = 1e-4, 1e-5
WORKER = "--worker"  # first argument of a child process
DECODERS = ("cpu", "gpu", "auto", "hybrid")
LR = 0.05  # peak learning rate
# --quick on the photos: at 0.05 the tiny model's 1000-class head turns the cross-process
# rounding of the first steps (1e-7) into parameter differences of 1e-2 within 8 steps; at 0.01
# they stay rounding-sized.
QUICK_PHOTOS_LR = 0.01
PHOTOS = {"train": 64, "eval": 16}  # images of the photo-like dataset's splits
# Photo sizes (heights, widths, long side of the large odd image): ImageNet's on a GPU, small
# ones for --quick.
PHOTO_SIZES = {False: ((333, 500), (375, 500), 4200), True: ((40, 64), (48, 80), 160)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.multiprocess", description=__doc__)
    p.add_argument("--processes", type=int, default=2, help="K training processes")
    p.add_argument(
        "--decoder",
        default="cpu",
        choices=DECODERS,
        help="cpu: the digits dataset; others: photo-like JPEGs decoded as the training "
        "program's --decoder (--quick: a CPU stand-in for the GPU decoder)",
    )
    p.add_argument("--quick", action="store_true", help="CPU: tiny model and images")
    p.add_argument("--model", default="seresnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--per-device-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--workdir", type=Path, default=Path("runs/multiprocess"))
    p.add_argument("--out", type=Path, default=None, help="JSON result (default: in workdir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    args, train_argv = p.parse_known_args(argv)
    args.train_argv = train_argv  # more flags of the training program
    if args.quick:
        args.model, args.image_size, args.per_device_batch = QUICK_MODEL, 16, 4
        args.steps, args.checkpoint_every = 12, 4
    return args


def worker(argv: list[str]) -> int:
    """One training process, argv = [pid (-1: the one-process reference), port, processes,
    quick (0/1), decoder stand-in (0/1), *training program flags]: join the K-process job, run
    the program."""
    import jax

    pid, port, processes, quick, stand_in = map(int, argv[:5])
    if pid >= 0:
        jax.distributed.initialize(f"127.0.0.1:{port}", processes, pid)
    if quick:
        register_quick_model()
    if stand_in:
        install_gpu_decoder_stand_in()
    from flax_attention.cli.train import main as train_main

    return train_main(argv[5:])


def install_gpu_decoder_stand_in() -> None:
    """In this process, every local device counts as one that decodes JPEGs
    (`gpu_decoding_available`) and the GPU decoders chosen decode with
    `gpu_decode.CpuReferenceDecoder` (the GPU decoder's arithmetic on the host, its result put on
    the device each is made for) instead of nvImageCodec."""
    from flax_attention import data
    from flax_attention.data import decoders, gpu_decode

    choose = data.choose_decoder

    def choose_with_stand_in(*args: Any, **kwargs: Any) -> data.Decoder:
        decoder = choose(*args, **kwargs)
        if isinstance(decoder, data.GpuDecoder):
            return dataclasses.replace(decoder, plan_decoder=gpu_decode.CpuReferenceDecoder)
        return decoder

    decoders.gpu_decoding_available = lambda: True
    data.choose_decoder = choose_with_stand_in


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One run of the training program in `count` child processes (count=1 with pid -1: the
    one-process reference on every device)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, distributed: bool):
        self.args, self.workdir = args, workdir
        k = args.processes
        devices = k * (CPU_DEVICES_PER_PROCESS if args.quick else 1)
        train = ["--model", args.model, "--dataset", args.dataset, "--data-dir", str(args.data_dir)]
        train += ["--image-size", str(args.image_size), "--steps", str(args.steps)]
        train += ["--batch-size", str(args.per_device_batch * devices)]
        train += ["--lr", str(QUICK_PHOTOS_LR if stand_in(args) else LR)]
        train += ["--checkpoint-every", str(args.checkpoint_every), "--log-every", "2"]
        train += ["--eval-every", "0", "--parallel", "jit", "--precision", args.precision]
        train += ["--decoder", args.decoder, "--no-progress", "--workdir", str(workdir)]
        port = _free_port()
        self.commands, self.envs = [], []
        for pid in range(k) if distributed else [-1]:
            cmd = [sys.executable, "-m", "benchmarks.lab.multiprocess", WORKER]
            cmd += [str(pid), str(port), str(k), str(int(args.quick)), str(int(stand_in(args)))]
            cmd += [*train, *args.train_argv]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
            env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # no TF32: a float32 comparison
            local = CPU_DEVICES_PER_PROCESS if args.quick else 1
            if args.quick:
                env["JAX_PLATFORMS"] = "cpu"
                count = local * (1 if distributed else k)
                # LLVM's optimisation passes off, as in the tests: compiling is most of a
                # quick run. Every run of the check compiles with the same flags.
                env["XLA_FLAGS"] = (
                    f"--xla_force_host_platform_device_count={count}"
                    " --xla_backend_optimization_level=0"
                )
                # Where a compilation cache is set (the tests'), the resumed run loads the
                # killed run's programs, however short their compiles.
                env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
            else:
                ids = [pid] if distributed else range(k)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
                # Deterministic reductions (no atomics in convolution backward passes): a run
                # repeated gives the same bits, so a difference is the row split's rounding.
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true"
            self.commands.append(cmd)
            self.envs.append(env)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[IO] = []

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = []
        try:
            for i, (command, env) in enumerate(zip(self.commands, self.envs, strict=True)):
                self.logs.append(open(self.workdir / f"log.{i}.txt", "a"))  # noqa: SIM115
                self.procs.append(
                    subprocess.Popen(
                        command, env=env, cwd=ROOT, stdout=self.logs[-1], stderr=subprocess.STDOUT
                    )
                )
        except BaseException:
            self._stop()
            raise

    def wait(self) -> None:
        """Wait for every process; RuntimeError with the log's tail if one failed."""
        deadline = time.monotonic() + self.args.timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            self._stop()
        for i, proc in enumerate(self.procs):
            if proc.returncode != 0:
                tail = (self.workdir / f"log.{i}.txt").read_text()[-3000:]
                raise RuntimeError(f"process {i} exited with {proc.returncode}:\n{tail}")

    def kill_after_checkpoint(self) -> int:
        """SIGKILL every process once a checkpoint is committed; returns its step."""
        deadline = time.monotonic() + self.args.timeout
        try:
            while time.monotonic() < deadline:
                steps = committed_steps(self.workdir)
                if steps:
                    for proc in self.procs:
                        proc.send_signal(signal.SIGKILL)
                    for proc in self.procs:
                        proc.wait()
                    return max(steps)
                if any(proc.poll() is not None for proc in self.procs):
                    raise RuntimeError("a process ended before the first checkpoint was committed")
                time.sleep(0.02)
            raise TimeoutError("no checkpoint was committed")
        finally:
            self._stop()

    def _stop(self) -> None:
        """End the processes still running (an error, a timeout, Ctrl-C) and close the logs."""
        stop_processes(self.procs)
        for log in self.logs:
            log.close()


def committed_steps(workdir: Path) -> list[int]:
    """Steps of the committed checkpoints (orbax renames `<step>` into place when done)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]


def images_per_s(workdir: Path, after_step: int = 0) -> float | None:
    """Median logged throughput of the records past `after_step`, the first one left out
    (it holds the compilation)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    values = [r["images_per_s"] for r in records if "images_per_s" in r and r["step"] > after_step]
    return round(statistics.median(values[1:]), 1) if len(values) > 1 else None


def model_arrays(workdir: Path) -> dict[str, np.ndarray]:
    """The final model's arrays (parameters and BatchNorm statistics) by path."""
    import jax
    import orbax.checkpoint as ocp

    from flax_attention.checkpoint_metadata import STATE_DIR

    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore((workdir / "model" / STATE_DIR).absolute())
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(tree)}


def stand_in(args: argparse.Namespace) -> bool:
    """Whether the runs decode with the CPU stand-in for the GPU decoder (`--quick`, a decoder
    other than cpu)."""
    return args.quick and args.decoder != "cpu"


def prepare_dataset(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset of `args.decoder` written under the workdir (once); sets `args.dataset` and
    `args.data_dir`; returns its description for the result."""
    from flax_attention import data
    from flax_attention.data import photos

    args.data_dir = args.workdir / "tfds"
    if args.decoder == "cpu":
        args.dataset = "digits"
        data.build_digits(args.data_dir)
        return {"name": args.dataset}
    args.dataset = photos.TFDS_NAME
    heights, widths, large_side = PHOTO_SIZES[args.quick]
    photos.write_photo_dataset(
        args.data_dir,
        num_train=PHOTOS["train"],
        num_eval=PHOTOS["eval"],
        heights=heights,
        widths=widths,
        odd_images=True,
        large_side=large_side,
    )
    return {
        "name": args.dataset,
        "kind": "photo-like JPEGs (flax_attention.data.photos, odd images included)",
        "train_images": PHOTOS["train"],
        "eval_images": PHOTOS["eval"],
        "heights": list(heights),
        "widths": list(widths),
        "large_side": large_side,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Reference, killed and resumed runs under `args.workdir`; the result record."""
    start = time.perf_counter()
    dataset = prepare_dataset(args)
    ref_dir, multi_dir = args.workdir / "one_process", args.workdir / f"{args.processes}_processes"
    for path in (ref_dir, multi_dir):
        if path.exists():
            raise FileExistsError(f"{path} exists; choose a fresh --workdir")
    reference = Job(args, ref_dir, distributed=False)
    reference.start()
    reference.wait()
    killed = Job(args, multi_dir, distributed=True)
    killed.start()
    killed_after = killed.kill_after_checkpoint()
    resumed = Job(args, multi_dir, distributed=True)
    resumed.start()
    resumed.wait()
    log = (multi_dir / "log.0.txt").read_text()
    found = re.findall(r"resumed from \S*checkpoints/(\d+)", log)
    resumed_from = int(found[-1]) if found else None
    want, got = model_arrays(ref_dir), model_arrays(multi_dir)
    assert want.keys() == got.keys(), "the two runs saved different models"
    diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    # Each array's largest difference in units of its tolerance (np.allclose's: <= 1 inside).
    excess = {
        k: float(np.max(np.abs(got[k] - want[k]) / (ATOL + RTOL * np.abs(want[k])))) for k in want
    }
    worst = max(excess, key=excess.get)
    close = excess[worst] <= 1
    return {
        "processes": args.processes,
        "devices_per_process": CPU_DEVICES_PER_PROCESS if args.quick else 1,
        "platform": "cpu" if args.quick else "gpu",
        "decoder": args.decoder,
        "decoder_stand_in": stand_in(args),
        "dataset": dataset,
        "model": args.model,
        "image_size": args.image_size,
        "global_batch": args.per_device_batch * reference_device_count(args),
        "precision": args.precision,
        "steps": args.steps,
        "img_per_s": {
            "one_process": images_per_s(ref_dir),
            "multi_process_resumed": images_per_s(multi_dir, resumed_from or 0),
        },
        "killed_after_checkpoint": killed_after,
        "resumed_from_step": resumed_from,
        "bitwise_equal": all(np.array_equal(got[k], want[k]) for k in want),
        "max_abs_param_diff": diff,
        "worst_array": {
            "path": worst,
            "max_abs_diff": float(np.max(np.abs(got[worst] - want[worst]))),
            "max_abs_value": float(np.max(np.abs(want[worst]))),
            "in_tolerances": round(excess[worst], 2),
        },
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "pass": bool(close and resumed_from is not None and resumed_from < args.steps),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def reference_device_count(args: argparse.Namespace) -> int:
    return args.processes * (CPU_DEVICES_PER_PROCESS if args.quick else 1)


def main(argv: list[str] | None = None) -> int:
    """Run the check and write the JSON result; 0 if it passed, 1 if not."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        return worker(argv[1:])
    args = parse(argv)
    result = run(args)
    out = args.out or args.workdir / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
