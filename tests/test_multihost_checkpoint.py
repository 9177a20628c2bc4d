"""In a 2-process (multi-host) run, process 0 alone saves and restores the model checkpoint."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from flax import nnx

    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    jax.devices()
    import flax_attention as fa
    from flax_attention import checkpoint

    if pid == 0:
        model = fa.SE(32, 4, rngs=nnx.Rngs(0))
        checkpoint.save(model, out)
        restored = checkpoint.restore(fa.SE(32, 4, rngs=nnx.Rngs(1)), out)
        x = np.ones((1, 3, 3, 32), np.float32)
        np.testing.assert_array_equal(restored(x), model(x))
    print("ok", pid)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_zero_saves_alone(tmp_path):
    port = str(_free_port())
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, str(tmp_path / "model")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for pid, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {pid} failed:\n{out[-3000:]}"
        assert f"ok {pid}" in out
    assert (tmp_path / "model" / "flax_attention.json").is_file()
