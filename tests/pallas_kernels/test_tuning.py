"""pallas_kernels.tuning: BlockSizes validation, the tables and the device-kind lookup."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from pallas_kernels import tuning
from pallas_kernels.layout import K_MULTIPLE, N_MULTIPLE
from pallas_kernels.tuning import (
    DEFAULT_BLOCK_SIZES,
    PLATFORMS,
    SMALL_M,
    TUNED_BLOCK_SIZES,
    BlockSizes,
    block_sizes_for,
)


def _all_tables():
    yield from DEFAULT_BLOCK_SIZES.items()
    for platform, kinds in TUNED_BLOCK_SIZES.items():
        for table in kinds.values():
            yield platform, table


def test_tables_respect_layout_and_platform_constraints():
    assert set(DEFAULT_BLOCK_SIZES) == set(TUNED_BLOCK_SIZES) == set(PLATFORMS)
    for platform, table in _all_tables():
        assert set(table) == set(tuning.VARIANTS)
        for b in table.values():
            assert K_MULTIPLE % b.block_k == 0 and N_MULTIPLE % b.block_n == 0 and b.block_k % 32 == 0
            assert all(v & (v - 1) == 0 for v in dataclasses.astuple(b)), b
            for bits in (2, 3, 4):
                assert b.check(platform, bits) is b


@pytest.mark.parametrize("platform", PLATFORMS)
def test_variants_and_unknown_device_kind_falls_back_to_the_default(platform):
    table = DEFAULT_BLOCK_SIZES[platform]
    assert block_sizes_for(platform, SMALL_M, device_kind="no such device") == table["small"]
    assert block_sizes_for(platform, SMALL_M + 1, device_kind="no such device") == table["large"]
    # None: this machine's device kind (a CPU here, or an untuned accelerator)
    kind = jax.devices()[0].device_kind
    if kind not in TUNED_BLOCK_SIZES[platform]:
        assert block_sizes_for(platform, 1000) == table["large"]


def test_tpu_cuts_block_m_to_8_for_few_rows():
    assert block_sizes_for("tpu", 8, device_kind="x").block_m == 8
    assert block_sizes_for("tpu", 9, device_kind="x").block_m == DEFAULT_BLOCK_SIZES["tpu"]["small"].block_m


def test_a_tuned_device_kind_is_used(monkeypatch):
    tuned = {"small": BlockSizes(16, 64, 128), "large": BlockSizes(32, 128, 64)}
    monkeypatch.setitem(TUNED_BLOCK_SIZES["gpu"], "NVIDIA H100 80GB HBM3", tuned)
    assert block_sizes_for("gpu", 4, device_kind="NVIDIA H100 80GB HBM3") == tuned["small"]
    assert block_sizes_for("gpu", 400, device_kind="NVIDIA H100 80GB HBM3") == tuned["large"]
    # the entry is per platform: the TPU kernel never gets GPU tiles
    assert block_sizes_for("tpu", 400, device_kind="NVIDIA H100 80GB HBM3") == DEFAULT_BLOCK_SIZES["tpu"]["large"]


@pytest.mark.parametrize("args,message", [
    ((16, 128, 48), r"block_k=48 is not supported; accepted: a power of two"),
    ((16, 128, 16), r"block_k=16 is not supported; accepted: a multiple of 32 dividing K_MULTIPLE=256 \(32, 64, 128, 256\)"),
    ((16, 128, 512), r"block_k=512 .*dividing K_MULTIPLE=256"),
    ((16, 256, 256), r"block_n=256 is not supported; accepted: a power of two dividing N_MULTIPLE=128"),
    ((24, 128, 256), r"block_m=24 is not supported; accepted: a power of two"),
    ((0, 128, 256), r"block_m=0 is not supported"),
    ((16.0, 128, 256), r"block_m=16.0 is not supported"),
    ((True, 128, 256), r"block_m=True is not supported"),
])
def test_invalid_block_sizes_raise_naming_the_value(args, message):
    with pytest.raises(ValueError, match=message):
        BlockSizes(*args)


@pytest.mark.parametrize("platform,bits,args,message", [
    ("gpu", 2, (8, 128, 256), r"block_m=8 is too small for the GPU kernel; accepted: >= 16"),
    ("gpu", 2, (16, 8, 256), r"block_n=8 is too small for the GPU kernel"),
    ("tpu", 2, (4, 128, 256), r"block_m=4 is not supported on TPU; accepted: a multiple of 8"),
    ("tpu", 2, (8, 64, 256), r"block_n=64 is not supported on TPU; accepted: 128"),
    ("tpu", 2, (8, 128, 64), r"block_k=64 is not supported on TPU for bits=2; accepted: a multiple of 128"),
    ("tpu", 3, (8, 128, 128), r"block_k=128 .*bits=3.*\(block_k \* 1 / 32 = 4\) are a multiple of 8"),
    ("tpu", None, (8, 128, 128), r"block_k=128 .*bits=None"),
    ("cuda", 2, (16, 128, 256), r"platform='cuda' is not supported; accepted: \('gpu', 'tpu'\)"),
])
def test_platform_constraints_raise_naming_the_value(platform, bits, args, message):
    with pytest.raises(ValueError, match=message):
        BlockSizes(*args).check(platform, bits)


def test_accepted_platform_tiles():
    assert BlockSizes(16, 16, 32).check("gpu", 3)
    assert BlockSizes(8, 128, 128).check("tpu", 2) and BlockSizes(8, 128, 128).check("tpu", 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BlockSizes(16, 128, 256).block_m = 32
