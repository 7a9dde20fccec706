"""A storage format and quantizer added from outside the package, in this one file: registered, they
are offered by spaces and plans, and pass the whole contract suite."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from compsearch.compress.bits import SCALE_BITS, pack_bits, packed_nbytes, unpack_bits
from compsearch.compress.formats import FORMATS, StorageFormat
from compsearch.compress.techniques import QUANTIZERS, Quantizer
from compsearch.spaces import LayerPlan, PlanError, Space

from .format_contract import QuantizerContract


@dataclass
class RowScaled:
    """Symmetric codes around 2**(bits-1) with one fp16 scale per row."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() - (1 << (self.bits - 1))) * self.scales.float().unsqueeze(1)


class PerRowSymmetric(StorageFormat):
    name = "test-per-row"
    trainable = "scales"

    def values_nbytes(self, rows, cols, count, bits, group_size):
        return packed_nbytes(count, bits) + rows * SCALE_BITS // 8

    def pack(self, quantized, keep):
        codes = quantized.codes[keep] if keep is not None else quantized.codes
        return {"codes": pack_bits(codes, quantized.bits), "scales": quantized.scales.contiguous()}

    def unpack(self, parts, shape, bits, group_size, keep):
        rows, cols = shape
        codes = torch.full(shape, 1 << (bits - 1), dtype=torch.uint8)  # pruned: the middle code, exactly 0
        if keep is None:
            codes = unpack_bits(parts["codes"], bits, rows * cols).reshape(shape)
        else:
            codes[keep] = unpack_bits(parts["codes"], bits, int(keep.sum()))
        return RowScaled(codes, parts["scales"], bits)


def quantize_per_row(values, bits, group_size, stats, keep, key):
    half = (1 << (bits - 1)) - 1
    scales = (values.abs().amax(dim=1) / half).clamp(min=1e-8).half()
    codes = torch.round(values / scales.float().unsqueeze(1)).clamp(-half, half) + (1 << (bits - 1))
    return RowScaled(codes.to(torch.uint8), scales, bits)


@pytest.fixture(autouse=True, scope="module")
def registered():
    with FORMATS.registered(PerRowSymmetric()), \
            QUANTIZERS.registered(Quantizer("test-per-row", "test-per-row", quantize_per_row, bits=(3, 4, 6, 8))):
        yield


class TestPluginQuantizer(QuantizerContract):
    @pytest.fixture
    def quant_method(self):
        return "test-per-row"


def test_spaces_and_plans_offer_a_registered_quantizer():
    space = Space("plug-in", bits=(4, 16), quant_methods=("rtn", "test-per-row"))
    assert space.knobs()["quant_method"] == ("rtn", "test-per-row")
    with pytest.raises(PlanError, match=r"stores bits \(3, 4, 6, 8\), not 2"):
        LayerPlan(bits=2, quant_method="test-per-row")


def test_an_installed_plugin_registers_itself_in_every_process(tmp_path):
    """A distribution with a `compsearch.plugins` entry point is imported with the registries, so Ray
    workers (fresh processes) know its techniques too."""
    (tmp_path / "plug_rtn.py").write_text(
        "from compsearch.compress.techniques import QUANTIZERS, Quantizer\n"
        "QUANTIZERS.register(Quantizer('plug-rtn', 'affine', QUANTIZERS.get('rtn').quantize))\n")
    info = tmp_path / "plug_rtn-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-rtn\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[compsearch.plugins]\nplug-rtn = plug_rtn\n")
    script = ("from compsearch.spaces import LayerPlan\n"
              "print(LayerPlan(bits=4, quant_method='plug-rtn').quant_method)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "plug-rtn"
