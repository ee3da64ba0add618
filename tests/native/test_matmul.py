import sys
from pathlib import Path

import pytest
import torch

from compressor import formats
from compressor.native.matmul import KernelWeight, matmul, takes_int8_activations, unpack

METHODS = ("nf4", "fp4", "int4", "int3", "int2", "int8", "int8-sym")


def packed(method: str, shape=(200, 192), seed=0, **options):
    torch.manual_seed(seed)
    w = torch.randn(shape)
    cfg = formats.config_for(method, **options)
    return formats.format_for(cfg).quantize(w, cfg)


@pytest.mark.parametrize("method", METHODS)
def test_every_format_multiplies_by_exactly_its_dequantized_weight(method):
    q, state = packed(method)
    weight = formats.kernel_weight(q, state)
    x = torch.randn(11, 192)
    expected = x.double() @ formats.dequantize(q, state).double().T
    torch.testing.assert_close(matmul(x, weight).double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_row_gets_the_same_bits_in_any_batch_and_from_the_portable_build(method):
    q, state = packed(method, seed=1)
    weight = formats.kernel_weight(q, state)
    x = torch.randn(21, 192)
    full = matmul(x, weight)
    for rows in (1, 2, 3, 7, 8, 13):
        assert torch.equal(matmul(x[:rows], weight), full[:rows])
    assert torch.equal(matmul(x, weight, portable=True), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_weights_match_torch_and_keep_rows_independent(dtype):
    w, x = torch.randn(130, 96).to(dtype), torch.randn(9, 96)
    weight = KernelWeight.of_float(w)
    full = matmul(x, weight)
    torch.testing.assert_close(full, x @ w.float().T, rtol=1e-5, atol=1e-4)
    assert torch.equal(matmul(x[:3], weight), full[:3])
    assert torch.equal(matmul(x, weight, portable=True), full)


def test_bias_and_accumulation_add_to_the_product():
    w, x, bias = torch.randn(40, 64), torch.randn(3, 64), torch.randn(40)
    weight = KernelWeight.of_float(w)
    out = torch.ones(3, 40)
    matmul(x, weight, bias, out=out, accumulate=True)
    torch.testing.assert_close(out, 1 + x @ w.T + bias, rtol=1e-5, atol=1e-4)


def test_blocks_larger_than_a_row_unit_and_short_int4_blocks_decode_right():
    for method, blocksize, cols in (("nf4", 128, 256), ("int4", 128, 160), ("int4", 32, 96)):
        q, state = packed(method, shape=(24, cols), blocksize=blocksize)
        x = torch.randn(5, cols)
        expected = x.double() @ formats.dequantize(q, state).double().T
        torch.testing.assert_close(matmul(x, formats.kernel_weight(q, state)).double(), expected, rtol=0, atol=2e-5)


def test_layouts_the_kernels_do_not_take_have_no_kernel_weight():
    q, state = packed("nf4", shape=(10, 96), blocksize=64)  # blocks straddle rows
    assert formats.kernel_weight(q, state) is None
    q, state = packed("int4", shape=(10, 96), blocksize=16)  # blocks shorter than the kernel's unit
    assert formats.kernel_weight(q, state) is None


@pytest.mark.parametrize("method", ("nf4", "fp4", "int4", "int3", "int8", "int8-sym"))
def test_int8_activations_stay_within_a_percent_and_keep_rows_independent(method):
    q, state = packed(method, shape=(96, 256), seed=2)
    weight = formats.kernel_weight(q, state)
    if not takes_int8_activations(weight):
        pytest.skip("this CPU has no AVX-512 VNNI: int8 activations fall back to float32")
    x = torch.randn(13, 256)
    exact, quick = matmul(x, weight), matmul(x, weight, activations="int8")
    assert not torch.equal(exact, quick)  # it does quantize
    assert (quick - exact).norm() / exact.norm() < 0.015
    for rows in (1, 4, 9):
        assert torch.equal(matmul(x[:rows], weight, activations="int8"), quick[:rows])


@pytest.mark.parametrize("method", ("nf4", "int4", "int8", "int8-sym"))
def test_int8_products_give_the_same_bits_on_amx_tiles_and_vnni_lanes_in_any_batch(method):
    q, state = packed(method, shape=(90, 256), seed=3)  # 90: a last block of 10 weight rows
    weight = formats.kernel_weight(q, state)
    if not takes_int8_activations(weight):
        pytest.skip("this CPU has no AVX-512 VNNI: int8 activations fall back to float32")
    x, bias = torch.randn(37, 256), torch.randn(90)  # 37: two full tiles of activation rows and 5
    start = torch.randn(37, 90)
    every = matmul(x, weight, bias=bias, out=start.clone(), accumulate=True, activations="int8")
    for tiles in (True, False):
        for rows in (1, 2, 16, 17, 37):
            got = matmul(x[:rows], weight, bias=bias, out=start[:rows].clone(), accumulate=True, activations="int8", tiles=tiles)
            assert torch.equal(got, every[:rows]), (tiles, rows)


def test_products_the_int8_kernels_do_not_take_stay_exact():
    w, x = torch.randn(64, 96), torch.randn(4, 96)  # float weight; rows of 96, not a multiple of 64
    weight = KernelWeight.of_float(w)
    assert not takes_int8_activations(weight)
    assert torch.equal(matmul(x, weight, activations="int8"), matmul(x, weight))


@pytest.mark.parametrize("method", METHODS)
def test_unpack_gives_exactly_the_dequantized_weight(method):
    q, state = packed(method, seed=3)
    assert torch.equal(unpack(formats.kernel_weight(q, state)), formats.dequantize(q, state).float())


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_unpack_to_bfloat16_rounds_as_torch_does(method):
    q, state = packed(method, seed=4)
    weight = formats.kernel_weight(q, state)
    assert torch.equal(unpack(weight, dtype=torch.bfloat16), unpack(weight).to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        unpack(weight, dtype=torch.float16)


def test_a_machine_without_a_c_compiler_gets_one_line_naming_what_is_missing(monkeypatch, tmp_path):
    import compressor.native as native

    monkeypatch.setattr(native, "CACHE", tmp_path)  # nothing built there yet
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(native.NativeBuildError, match="no C compiler") as refused:
        native.build()
    assert "\n" not in str(refused.value) and not list(tmp_path.iterdir())


def test_an_interrupted_build_leaves_no_partial_library(monkeypatch, tmp_path):
    import compressor.native as native

    monkeypatch.setattr(native, "CACHE", tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(native.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        native.build()
    assert not list(tmp_path.iterdir())


def test_a_build_removes_the_partial_library_a_killed_build_left(monkeypatch, tmp_path):
    import subprocess

    import compressor.native as native

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process that is gone, as a killed build's would be
    monkeypatch.setattr(native, "CACHE", tmp_path)

    def compiled(cmd, **kwargs):
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"library")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(native.subprocess, "run", compiled)
    target = native.build()
    partial = target.with_name(f".{target.name}.tmp-{child.pid}.so")
    partial.write_bytes(b"half a library")
    target.unlink()
    assert native.build() == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_back_to_back_calls_of_different_sizes_share_the_pool_safely():
    # A worker holding an earlier call's claim word once took a chunk of the next, larger call
    # against the earlier call's freed arguments: seen as a rare crash under serving load
    # (tests/serve/test_api.py), which this loop does not reliably reproduce from Python.
    small, large = KernelWeight.of_float(torch.randn(3, 32)), KernelWeight.of_float(torch.randn(64, 32))
    x = torch.randn(1, 32)
    want_small, want_large = matmul(x, small, threads=1), matmul(x, large, threads=1)
    for _ in range(3000):
        assert torch.equal(matmul(x, small, threads=2), want_small)
        assert torch.equal(matmul(x, large, threads=2), want_large)
