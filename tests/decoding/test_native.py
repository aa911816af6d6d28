"""The native few-row kernel: its product against a float64 reference, each token's result independent of the rows
beside it (bit for bit), built once into the cache and rebuilt when the cached file is damaged, and a missing or
broken compiler leaves the planner without it (a reason, never an error)."""

import os
import shutil

import pytest
import torch

from spectool.decoding import kernels, native
from spectool.decoding.kernels import Choice, PlannedLinear

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason=f"no native kernel: {native.unavailable_reason()}")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not looked the kernel up yet, with an empty cache."""
    monkeypatch.setenv("SPECTOOL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)
    return tmp_path


@needs_kernel
@pytest.mark.parametrize(("rows", "out", "width"), [(1, 64, 32), (3, 100, 36), (8, 9, 8), (11, 130, 72), (17, 7, 5)])
def test_the_product_is_the_linear_product(rows, out, width):
    gen = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, width, generator=gen), torch.randn(out, width, generator=gen)
    got = native.few_rows(x, weight)
    assert got.shape == (rows, out) and got.dtype == torch.float32
    expected = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_each_tokens_result_does_not_depend_on_the_rows_beside_it():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(203, 576, generator=gen), torch.randn(16, 576, generator=gen)
    alone = torch.cat([native.few_rows(x[i : i + 1], weight) for i in range(16)])
    for rows in range(2, 17):
        assert torch.equal(native.few_rows(x[:rows], weight), alone[:rows]), rows
    assert not torch.equal(alone, x @ weight.T)  # BLAS sums in another order: the check above can fail


@needs_kernel
def test_the_kernel_refuses_what_it_does_not_multiply():
    with pytest.raises(ValueError, match="float32"):
        native.few_rows(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        native.few_rows(torch.randn(8, 2).t(), torch.randn(4, 8))
    assert not kernels.native_fits(torch.randn(4, 8, dtype=torch.bfloat16))
    assert kernels.native_fits(torch.randn(4, 8))


@needs_kernel
def test_built_once_into_the_cache_and_rebuilt_when_damaged(fresh):
    compiler = shutil.which(os.environ.get("CC") or "cc")
    library = native._built(compiler)  # built, not loaded
    library.unlink()
    library.write_bytes(b"not a shared library")  # a damaged file in the cache
    assert native.kernel() is not None and native.unavailable_reason() == ""
    assert library.read_bytes()[:4] == b"\x7fELF"
    built = library.stat().st_mtime_ns
    native._loaded = None  # a new process: the cached build answers
    assert native.kernel() is not None and library.stat().st_mtime_ns == built
    assert list((fresh / "native").iterdir()) == [library]
    x, weight = torch.randn(2, 16), torch.randn(5, 16)
    torch.testing.assert_close(native.few_rows(x, weight), x @ weight.T)


def test_no_compiler_leaves_the_planner_without_it(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    assert native.kernel() is None and "no C compiler" in native.unavailable_reason()
    weight = torch.randn(4, 8)
    assert not kernels.native_fits(weight)
    with pytest.raises(ValueError, match="native kernel"):
        PlannedLinear(weight, None, {1: Choice("native", 1)}, column=False)
    with pytest.raises(RuntimeError, match="not available: no C compiler"):
        native.few_rows(torch.randn(1, 8), weight)
    assert "|no-native|" in kernels.machine_key(torch.float32, {"qkv": (4, 8, 1)})


def test_a_failing_compiler_is_a_reason_not_an_error(fresh, monkeypatch):
    broken = fresh / "cc"
    broken.write_text(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\necho 'cc: fatal error: no' >&2\nexit 1\n"
    )
    os.chmod(broken, 0o755)
    monkeypatch.setenv("CC", str(broken))
    assert native.kernel() is None
    assert native.unavailable_reason() == "the kernel did not build or load: cc: fatal error: no"
    assert not list((fresh / "native").glob("*"))  # no partial file left behind
