"""The native few-row kernel: its product against a float64 reference, each token's result independent of the rows
beside it (bit for bit), built once into the cache and rebuilt when the cached file is damaged, and a missing or
broken compiler leaves the planner without it (a reason, never an error)."""

import os
import shutil

import pytest
import torch

from spectool.decoding import kernels, native
from spectool.decoding.kernels import Choice, PlannedLinear

needs_kernel = pytest.mark.skipif(native.library() is None, reason=f"no native kernel: {native.unavailable_reason()}")


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
    assert native.library() is not None and native.unavailable_reason() == ""
    assert library.read_bytes()[:4] == b"\x7fELF"
    built = library.stat().st_mtime_ns
    native._loaded = None  # a new process: the cached build answers
    assert native.library() is not None and library.stat().st_mtime_ns == built
    assert list((fresh / "native").iterdir()) == [library]
    x, weight = torch.randn(2, 16), torch.randn(5, 16)
    torch.testing.assert_close(native.few_rows(x, weight), x @ weight.T)


def test_no_compiler_leaves_the_planner_without_it(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    assert native.library() is None and "no C compiler" in native.unavailable_reason()
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
    assert native.library() is None
    assert native.unavailable_reason() == "the kernels did not build or load: cc: fatal error: no"
    assert not list((fresh / "native").glob("*"))  # no partial file left behind


@needs_kernel
@pytest.mark.parametrize("scaled", [True, False])
def test_rms_norm_is_transformers_rms_norm(scaled):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 76, generator=gen) * 3
    weight = torch.randn(76, generator=gen) if scaled else None
    variance = x.double().pow(2).mean(-1, keepdim=True)
    expected = (x.double() * torch.rsqrt(variance + 1e-5)).float()
    expected = weight * expected if scaled else expected
    got = native.rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="another width"):
        native.rms_norm(x, torch.randn(75), 1e-5)
    with pytest.raises(ValueError, match="another width"):
        native.rms_norm(x.transpose(0, 1), weight, 1e-5)  # not contiguous


@needs_kernel
def test_rotary_store_rotates_like_torch_and_writes_the_caches_at_their_positions():
    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, d, capacity, start = 3, 4, 2, 8, 16, 5
    qkv = torch.randn(1, n, heads + 2 * kv_heads, d, generator=gen)
    qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
    cos, sin = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    keys, values = torch.zeros(2, kv_heads, capacity, d), torch.zeros(2, kv_heads, capacity, d)
    q = native.rotary_store(qk, v, cos, sin, keys, values, start)
    half = d // 2
    rotated = (qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin[:, None]).transpose(1, 2)
    assert torch.equal(q, rotated[:, :heads])  # the same products and sums as torch's: bit for bit
    assert torch.equal(keys[:1, :, start : start + n], rotated[:, heads:])
    assert torch.equal(values[:1, :, start : start + n], v.transpose(1, 2))
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[start : start + n] = False
    assert not keys[:, :, untouched].any() and not values[:, :, untouched].any() and not keys[1:].any()
    with pytest.raises(ValueError, match="at position 14"):
        native.rotary_store(qk, v, cos, sin, keys, values, capacity - 2)  # would write past the cache
    with pytest.raises(ValueError, match="native rotary"):
        native.rotary_store(qk, v, cos[:2], sin[:2], keys, values, 0)
    with pytest.raises(ValueError, match="native rotary"):
        native.rotary_store(qk.transpose(2, 3), v, cos, sin, keys, values, 0)


@needs_kernel
def test_attention_is_torchs_attention_and_each_query_stands_alone():
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, d, capacity, length = 4, 6, 2, 16, 32, 11
    q = torch.randn(1, heads, n, d, generator=gen)
    keys, values = (
        torch.randn(2, kv_heads, capacity, d, generator=gen),
        torch.randn(2, kv_heads, capacity, d, generator=gen),
    )
    causal = torch.ones(n, length, dtype=torch.bool).tril(length - n)
    tree = torch.rand(n, length, generator=gen) < 0.6
    tree[:, 0] = True  # every query sees at least one position
    for mask in (None, causal, tree, causal[None, None]):
        got = native.attention(q, keys, values, mask, length, 0.3)
        expected = F.scaled_dot_product_attention(
            q, keys[:1, :, :length], values[:1, :, :length], attn_mask=mask, scale=0.3, enable_gqa=True
        )
        assert got.shape == (1, n, heads * d)
        torch.testing.assert_close(got, expected.transpose(1, 2).reshape(1, n, -1), rtol=1e-5, atol=1e-5)
    for t in range(n):  # one query alone reads what it read beside the others, bit for bit
        alone = native.attention(q[:, :, t : t + 1].contiguous(), keys, values, causal[t : t + 1], length, 0.3)
        assert torch.equal(alone[0, 0], native.attention(q, keys, values, causal, length, 0.3)[0, t])
    with pytest.raises(ValueError, match="native attention"):
        native.attention(q, keys, values, causal, capacity + 1, 0.3)
    with pytest.raises(ValueError, match="native attention"):
        native.attention(q, keys, values, causal.float(), length, 0.3)


@needs_kernel
@pytest.mark.parametrize(("rows", "out", "width"), [(1, 64, 32), (3, 100, 36), (11, 130, 72)])
def test_the_bf16_product_is_the_float32_product_of_the_same_values(rows, out, width):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=gen)
    half = torch.randn(out, width, generator=gen).to(torch.bfloat16)
    assert torch.equal(native.few_rows_bf16(x, half), native.few_rows(x, half.float()))  # bit for bit
    with pytest.raises(ValueError, match="bfloat16 weight"):
        native.few_rows_bf16(x, half.float())
