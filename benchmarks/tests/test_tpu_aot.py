"""The TPU AOT suite's bookkeeping with a stand-in compiler (the real compile for TPU is
tests/test_tpu_compile.py's): collective bytes from HLO text, resumable incremental results,
the largest-batch estimate, and its command line."""

import json
import math
from types import SimpleNamespace

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import tpu_aot
from flax_attention.models import list_models

HLO = """
  %all-reduce.1 = (f32[512]{0:T(512)S(1)}, bf16[4,8]{1,0}) all-reduce(%a, %b), channel_id=1
  %all-gather.2 = f32[4,2,128]{2,1,0:T(2,128)} all-gather(%param_0.1), dimensions={0}
  %all-gather-start.3 = (f32[2,128], f32[8,128]) all-gather-start(%c), dimensions={0}
  %all-gather-done.3 = f32[8,128]{1,0} all-gather-done(%all-gather-start.3)
  %add.4 = f32[512]{0} add(%x, %y)
"""


def test_collective_bytes_sums_each_kinds_results():
    """Tuple results add up, an asynchronous pair counts once (its -done's result), other ops
    count nothing."""
    gathered = 4 * 2 * 128 * 4 + 8 * 128 * 4
    assert tpu_aot.collective_bytes(HLO) == {
        "all-gather": gathered,
        "all-reduce": 512 * 4 + 4 * 8 * 2,
        "total": gathered + 512 * 4 + 4 * 8 * 2,
    }


class FakeCompiled:
    """memory_analysis/cost_analysis/as_text of a step whose memory is `fixed + per_image * b`."""

    def __init__(self, batch: int, fixed: int = 2**30, per_image: int = 50 * 2**20):
        self.batch, self.fixed, self.per_image = batch, fixed, per_image

    def memory_analysis(self):
        return SimpleNamespace(
            argument_size_in_bytes=self.fixed,
            output_size_in_bytes=self.fixed // 2,
            alias_size_in_bytes=self.fixed // 2,
            temp_size_in_bytes=self.per_image * self.batch,
            generated_code_size_in_bytes=1,
        )

    def cost_analysis(self):
        return {"flops": 1e12 * self.batch, "bytes accessed": 1e9 * self.batch}

    def as_text(self):
        return HLO


def args_for(tmp_path, *extra):
    flags = ["--models", "resnet18", "--generations", "v5e,v4", "--slices", "host,64"]
    return tpu_aot.parse([*flags, "--out", str(tmp_path), *extra])


def test_a_rerun_compiles_only_what_the_results_file_lacks(tmp_path):
    """Each entry is on disk as soon as it is compiled; a rerun after an interruption compiles
    only the rest, and `--retry-errors` recompiles the entries that failed."""
    import jax

    calls, interrupt_at = [], [3]  # the third compile: after the first entry and its probe

    def compile_fn(entry, batch):
        calls.append(entry.key)
        if entry.generation == "v4" and entry.slice == "64":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of HBM\nmore")
        if len(calls) == interrupt_at[0]:
            interrupt_at[0] = 0
            raise KeyboardInterrupt
        return FakeCompiled(batch)

    args = args_for(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tpu_aot.run(args, compile_fn)
    first = json.loads((tmp_path / "tpu_aot.json").read_text())["rows"]
    assert [r["key"] for r in first] == ["resnet18|v5e|host|exact|128|224|bf16"]
    calls.clear()
    tpu_aot.run(args, compile_fn)
    rows = tpu_aot.read_rows(tmp_path / "tpu_aot.json")
    assert len(rows) == 2 + 2 + 2  # host: exact; 64 chips: exact and grouped, per generation
    assert "resnet18|v5e|host|exact|128|224|bf16" not in calls
    failed = [r for r in rows.values() if not r["ok"]]
    assert {r["slice"] for r in failed} == {"64"} and {r["generation"] for r in failed} == {"v4"}
    assert failed[0]["error"] == "JaxRuntimeError: RESOURCE_EXHAUSTED: out of HBM"
    assert "| v4 | 64 | failed: JaxRuntimeError: RESOURCE_EXHAUSTED" in tpu_aot.tables(failed)
    calls.clear()
    tpu_aot.run(args, compile_fn)
    assert calls == []
    tpu_aot.run(args_for(tmp_path, "--retry-errors"), compile_fn)
    assert sorted(set(calls)) == sorted(r["key"] for r in failed)


def test_a_row_holds_memory_roofline_collectives_and_largest_batch(tmp_path):
    """HBM = arguments + outputs + temporaries - aliased; the roofline takes the slower of
    compute and memory; the largest batch is the biggest power of two under the capacity."""
    args = args_for(tmp_path)
    entry = next(e for e in tpu_aot.entries(args) if e.generation == "v5e")
    row = tpu_aot.measure(entry, args, lambda e, b: FakeCompiled(b))
    fixed, per_image = 2**30, 50 * 2**20
    assert row["hbm_bytes"] == fixed + per_image * 128
    chip = tpu_aot.CHIPS["v5e"]
    step_s = max(1e12 * 128 / chip.peak_bf16_flops, 1e9 * 128 / chip.hbm_bytes_per_s)
    assert row["est_img_per_s_per_chip"] == pytest.approx(128 / step_s, abs=0.1)
    linear = (16 * 2**30 - fixed) // per_image
    assert row["max_batch"] == 2 ** int(math.log2(linear)) and row["max_batch_linear"] == linear
    assert row["collectives"] == {"all-gather": 2, "all-reduce": 1, "total": 3}
    table = tpu_aot.tables([row])
    assert f"| resnet18 | v5e | 4 | {row['hbm_gib']:.2f} (16) | {row['max_batch']} |" in table


def test_bisect_finds_the_power_of_two_boundary(tmp_path):
    """From a too-large start it halves; from a fitting one it doubles, to the same answer."""
    import jax

    def compile_fn(entry, batch):
        if batch > 512:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED")
        return FakeCompiled(batch)  # 16 GiB fits 1 GiB + 50 MiB x 256, not x 512

    entry = next(e for e in tpu_aot.entries(args_for(tmp_path)) if e.generation == "v5e")
    for start in (1024, 4, 256):
        assert tpu_aot.max_batch_bisect(entry, start, compile_fn)[0]["max_batch"] == 256


def test_grouped_batchnorm_only_where_the_slice_has_more_chips_than_a_group(tmp_path):
    keys = [e.key for e in tpu_aot.entries(args_for(tmp_path, "--generations", "v5e"))]
    assert keys == [
        "resnet18|v5e|host|exact|128|224|bf16",
        "resnet18|v5e|64|exact|128|224|bf16",
        "resnet18|v5e|64|grouped16|128|224|bf16",
    ]


def test_the_benchmarks_command_hands_tpu_aot_its_own_flags(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks --suites tpu_aot` runs this suite with its flags; an unknown
    generation or model is a usage error."""
    seen = []
    monkeypatch.setattr(tpu_aot, "run", lambda args: seen.append(args) or tmp_path / "x.json")
    bench_main.main(["--suites", "tpu_aot", "--generations", "v6e", "--out", str(tmp_path)])
    assert seen[0].generations == ("v6e",)
    assert seen[0].models == tuple(list_models())  # every registered model by default
    for flag, value in (("--generations", "v9"), ("--models", "resnet9")):
        with pytest.raises(SystemExit) as exit_info:
            bench_main.main(["--suites", "tpu_aot", flag, value])
        assert exit_info.value.code == 2
        assert f"{flag}: unknown {value};" in capsys.readouterr().err


def _row(generation: str, slice_: str, bn: str, **values):
    counts = {"total": 0}
    return {
        "ok": True,
        "model": "resnet50",
        "generation": generation,
        "slice": slice_,
        "bn": bn,
        "per_chip_batch": 128,
        "hbm_gib": 4.5,
        "hbm_capacity_gib": tpu_aot.CHIPS[generation].hbm_gib,
        "est_img_per_s_per_chip": 1899.4,
        "chips": {"host": 4, "64": 64, "256": 256}[slice_],
        "collectives": counts,
        "collective_bytes": {"total": 0},
    } | values


def test_readme_table_takes_the_host_row_and_the_largest_slice_of_each_generation():
    rows = [
        _row("v5e", "host", "exact", max_batch=256),
        _row("v5e", "64", "exact", collective_bytes={"total": 116.0e6}),
        _row("v5e", "256", "exact", collective_bytes={"total": 156.8e6}),
        _row("v5e", "256", "grouped", collective_bytes={"total": 107.3e6}),
        _row("v4", "host", "exact", hbm_gib=4.46, est_img_per_s_per_chip=2687.3),
        _row("v6e", "256", "exact"),  # no host row: no line
        _row("v5p", "host", "exact", model="seresnet50"),  # another model
    ]
    assert tpu_aot.readme_table(rows).splitlines()[2:] == [
        "| v4 | 128 | 4.46 (32) | - | 2,687 | - | - |",
        "| v5e | 128 | 4.50 (16) | 256 | 1,899 | 256 | 156.8 / 107.3 |",
    ]


def test_the_readme_quotes_the_committed_results():
    """The README's TPU table is `readme_table` of the committed tpu_aot.json (printed by
    `python -m benchmarks --suites tpu_aot --charts-only`)."""
    from benchmarks.settings import ROOT, TPU_AOT_RESULTS

    rows = list(tpu_aot.read_rows(TPU_AOT_RESULTS / "tpu_aot.json").values())
    assert tpu_aot.readme_table(rows) in (ROOT / "README.md").read_text()
