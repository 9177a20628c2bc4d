"""`convert` verifies a zip-format `.pth`'s CRCs before loading: a flipped bit in tensor data is
refused in one line naming the file, and nothing is written."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch

from flax_attention.cli import main
from flax_attention.convert import load_torch_checkpoint


def flip_a_tensor_byte(path) -> None:
    """Invert one byte in the middle of the first tensor data record of torch zip `path`."""
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/data/0")]
    assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
    start = info.header_offset + 30 + name_length + extra_length
    raw[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def damaged_pth(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"fc.weight": torch.arange(64.0).reshape(8, 8), "fc.bias": torch.zeros(8)}, path)
    assert load_torch_checkpoint(path)["fc.weight"][0, 1] == 1.0  # intact: loads
    flip_a_tensor_byte(path)
    return path


def test_a_flipped_bit_in_tensor_data_is_refused(damaged_pth):
    with pytest.raises(ValueError) as err:
        load_torch_checkpoint(damaged_pth)
    message = str(err.value)
    assert "\n" not in message and str(damaged_pth) in message and "CRC" in message


def test_convert_refuses_a_damaged_pth_in_one_line(damaged_pth, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(damaged_pth), str(out), "--model", "resnet18"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(damaged_pth) in err and "CRC" in err
    assert not out.exists()
