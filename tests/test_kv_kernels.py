"""Tests of the paged KV-cache data-plane kernels (ponder.hf.kernels / ponder._core).

Every kernel is compared with a readable torch reference defined at the top of this file:
write/copy/gather must match exactly (they only move bits); decode attention must match the
float32 reference within 1e-5 for float32 and, for float16/bfloat16, with an error at most twice
the error of the same computation done by torch in that dtype, plus a small absolute floor.

CUDA: every parametrised test also runs with device="cuda" when this build has CUDA kernels and
a device can run them (ponder.cuda_available()); elsewhere those cases are skipped.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch  # noqa: E402  (a test dependency: pip install ".[test]")

import ponder  # noqa: E402
from ponder import _core  # noqa: E402
from ponder.hf import kernels as K  # noqa: E402

CUDA_OK = ponder.cuda_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA build of ponder and a CUDA device")),
]
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA build of ponder and a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
BLOCK_SIZES = [1, 4, 16]
HEAD_CONFIGS = [(4, 4), (4, 1), (8, 2)]  # (num_q_heads, num_kv_heads): MHA, GQA 4:1, GQA 8:2
HEAD_DIMS = [8, 64, 24]


# ============================================================================ references (fp32 torch)


def ref_write_kv(k_cache, v_cache, k_new, v_new, slot_mapping):
    """Copies of the pools with token t's K/V stored at slot slot_mapping[t] (negative: skipped)."""
    nb, bs, h, d = k_cache.shape
    k, v = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k.view(nb * bs, h, d)[slots] = k_new[keep]
    v.view(nb * bs, h, d)[slots] = v_new[keep]
    return k, v


def ref_copy_blocks(k_caches, v_caches, src, dst):
    """Copies of every layer's pools with block dst[i] replaced by (the old) block src[i]."""
    src, dst = src.long(), dst.long()
    ks, vs = [], []
    for k, v in zip(k_caches, v_caches):
        k2, v2 = k.clone(), v.clone()
        k2[dst] = k[src]
        v2[dst] = v[src]
        ks.append(k2)
        vs.append(v2)
    return ks, vs


def ref_gather(cache, block_tables, lengths, max_len):
    """[B, max_len, H, D]: out[b, t] = cache[block_tables[b, t // bs], t % bs] for t < lengths[b], else 0."""
    bs, h, d = cache.shape[1:]
    out = cache.new_zeros((block_tables.shape[0], max_len, h, d))
    for b in range(block_tables.shape[0]):
        n = int(lengths[b])
        t = torch.arange(n, device=cache.device)
        out[b, :n] = cache[block_tables[b, t // bs].long(), t % bs]
    return out


def ref_decode(q, k_cache, v_cache, block_tables, lengths, scale, dtype=torch.float32):
    """Decode attention by explicit gather + softmax, computed entirely in `dtype`.

    dtype=float32 is the reference; float16/bfloat16 give the error torch itself makes in that
    precision (the yardstick for the kernel's low-precision tolerance).
    """
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    out = torch.zeros((batch, hq, d), dtype=dtype, device=q.device)
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            continue
        k = ref_gather(k_cache, block_tables[b : b + 1], lengths[b : b + 1], n)[0].to(dtype)  # [n, Hkv, D]
        v = ref_gather(v_cache, block_tables[b : b + 1], lengths[b : b + 1], n)[0].to(dtype)
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]: query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].to(dtype), k) * scale
        p = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


# ============================================================================ helpers


def make_tables(lengths, block_size, num_blocks, gen, slack=1, fill=-1):
    """Block tables (int32) giving each sequence distinct random blocks; unused entries = fill."""
    need = [math.ceil(n / block_size) for n in lengths]
    max_blocks = max(need + [0]) + slack
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lengths), max_blocks), fill, dtype=torch.int32)
    used = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[used : used + k].to(torch.int32)
        used += k
    return table


def rand(shape, dtype, gen, device="cpu"):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def make_k_new(layout, t, h, d, dtype, gen, device):
    """[T, H, D] in a given memory layout (same values for every layout)."""
    base = torch.randn((t, h, d), generator=gen).to(dtype)
    if layout == "contiguous":
        x = base.clone()
    elif layout == "transposed":  # last stride != 1
        x = base.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "fused":  # a slice of a fused [T, 3, H, D] projection
        big = torch.zeros((t, 3, h, d), dtype=dtype)
        big[:, 1] = base
        x = big[:, 1]
    elif layout == "padded":  # head_dim padded in memory
        big = torch.zeros((t, h, d + 3), dtype=dtype)
        big[..., :d] = base
        x = big[..., :d]
    else:
        raise AssertionError(layout)
    assert torch.equal(x, base)
    return x.to(device) if device == "cpu" else _to_device_keep_strides(x, device)


def _to_device_keep_strides(x, device):
    """Move a strided view to `device`, keeping its strides (by moving its base storage)."""
    base = x
    while base._base is not None:
        base = base._base
    moved = base.to(device)
    return moved.as_strided(x.shape, x.stride(), x.storage_offset())


def misaligned(shape, dtype, gen, device):
    """A contiguous tensor whose data starts one element past an aligned address."""
    n = math.prod(shape)
    flat = torch.randn(n + 1, generator=gen).to(dtype).to(device)
    return flat[1:].view(shape)


def assert_decode_close(out, q, kc, vc, bt, lengths, scale):
    ref32 = ref_decode(q, kc, vc, bt, lengths, scale)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=1e-5, rtol=1e-5)
        return
    ref_low = ref_decode(q, kc, vc, bt, lengths, scale, dtype=out.dtype)
    err = (out.float() - ref32).abs().max().item()
    err_torch = (ref_low.float() - ref32).abs().max().item()
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[out.dtype]
    assert err <= 2 * err_torch + floor, f"kernel error {err:.3g} vs torch-in-{out.dtype} error {err_torch:.3g}"


# A minimal DLPack producer (legacy "dltensor" capsules, no deleter) for the marshalling tests:
# it can describe memory on a device this machine does not have, or dtypes torch never exports.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_CAPSULE_NAME = b"dltensor"
_DL_CODES = {np.dtype(np.float32): (2, 32), np.dtype(np.int64): (0, 64), np.dtype(np.int32): (0, 32)}


class FakeDLPack:
    """Pre-1.0 producer: __dlpack__(stream=None) only, so ponder retries without max_version."""

    def __init__(self, shape, *, code=(2, 32), device=(1, 0), data=0x1000, strides=None, lanes=1, keep=None):
        self._keep = keep
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self._strides = (ctypes.c_int64 * len(strides))(*strides) if strides is not None else None
        t = _DLTensor()
        t.data = data
        t.device = _DLDevice(*device)
        t.ndim = len(shape)
        t.dtype = _DLDataType(code[0], code[1], lanes)
        t.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        if self._strides is not None:
            t.strides = ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64))
        t.byte_offset = 0
        self._mt = _DLManagedTensor(t, None, None)
        self._device = device

    @classmethod
    def of(cls, array):
        """A producer over a numpy array's memory (strides in elements; no numpy DLPack involved)."""
        return cls(
            array.shape,
            code=_DL_CODES[array.dtype],
            data=array.ctypes.data,
            strides=[s // array.itemsize for s in array.strides],
            keep=array,
        )

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, stream=None):
        return _PyCapsule_New(ctypes.addressof(self._mt), _CAPSULE_NAME, None)


# ============================================================================ write_kv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "fused", "padded"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_write_kv_matches_reference(dtype, block_size, head_dim, layout, device):
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim * 10 + len(layout))
    num_blocks, heads, tokens = 12, 3, 11
    kc = rand((num_blocks, block_size, heads, head_dim), dtype, gen, device)
    vc = rand((num_blocks, block_size, heads, head_dim), dtype, gen, device)
    k_new = make_k_new(layout, tokens, heads, head_dim, dtype, gen, device)
    v_new = make_k_new("contiguous" if layout == "transposed" else "transposed", tokens, heads, head_dim, dtype, gen, device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.arange(tokens) % 4 == 1] = -1  # padding tokens
    slots = slots.to(device)
    ref_k, ref_v = ref_write_kv(kc, vc, k_new, v_new, slots)
    K.write_kv(kc, vc, k_new, v_new, slots)
    assert torch.equal(kc.cpu(), ref_k.cpu())
    assert torch.equal(vc.cpu(), ref_v.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_write_kv_index_dtypes_and_empty(index_dtype, device):
    gen = torch.Generator().manual_seed(1)
    kc = rand((3, 4, 2, 8), torch.float16, gen, device)
    vc = rand((3, 4, 2, 8), torch.float16, gen, device)
    before = kc.clone(), vc.clone()
    empty = torch.empty((0, 2, 8), dtype=torch.float16, device=device)
    K.write_kv(kc, vc, empty, empty, torch.empty(0, dtype=index_dtype, device=device))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
    k_new = rand((2, 2, 8), torch.float16, gen, device)
    v_new = rand((2, 2, 8), torch.float16, gen, device)
    slots = torch.tensor([11, 0], dtype=index_dtype, device=device)
    K.write_kv(kc, vc, k_new, v_new, slots)
    assert torch.equal(kc[2, 3], k_new[0]) and torch.equal(vc[0, 0], v_new[1])


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_misaligned_pool(device):
    gen = torch.Generator().manual_seed(2)
    kc = misaligned((4, 4, 2, 8), torch.float16, gen, device)
    vc = misaligned((4, 4, 2, 8), torch.float16, gen, device)
    k_new, v_new = rand((5, 2, 8), torch.float16, gen, device), rand((5, 2, 8), torch.float16, gen, device)
    slots = torch.tensor([3, 15, -1, 7, 8], device=device)
    ref_k, ref_v = ref_write_kv(kc, vc, k_new, v_new, slots)
    K.write_kv(kc, vc, k_new, v_new, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_unchecked_bad_slots_are_skipped(device):
    gen = torch.Generator().manual_seed(3)
    kc = rand((2, 4, 1, 8), torch.float32, gen, device)
    vc = rand((2, 4, 1, 8), torch.float32, gen, device)
    k_new, v_new = rand((3, 1, 8), torch.float32, gen, device), rand((3, 1, 8), torch.float32, gen, device)
    slots = torch.tensor([1, 8, 10**12], device=device)  # 8 == num_blocks * block_size: out of range
    expect_k, expect_v = ref_write_kv(kc, vc, k_new[:1], v_new[:1], slots[:1])
    K.write_kv(kc, vc, k_new, v_new, slots, check_indices=False)
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


# ============================================================================ copy_blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layers", [1, 3, 40])  # 40 > the 32 layers one CUDA launch takes
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_copy_blocks_matches_reference(dtype, layers, index_dtype, device):
    gen = torch.Generator().manual_seed(layers)
    shape = (9, 4, 2, 24)
    ks = [rand(shape, dtype, gen, device) for _ in range(layers)]
    vs = [rand(shape, dtype, gen, device) for _ in range(layers)]
    src = torch.tensor([0, 3, 3, 8], dtype=index_dtype, device=device)
    dst = torch.tensor([1, 2, 5, 6], dtype=index_dtype, device=device)
    ref_k, ref_v = ref_copy_blocks(ks, vs, src, dst)
    K.copy_blocks(ks, vs, src, dst)
    for a, b in zip(ks + vs, ref_k + ref_v):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_empty_and_tuple(device):
    gen = torch.Generator().manual_seed(4)
    ks = (rand((3, 2, 1, 8), torch.bfloat16, gen, device),)
    vs = (rand((3, 2, 1, 8), torch.bfloat16, gen, device),)
    before = ks[0].clone()
    none = torch.empty(0, dtype=torch.int64, device=device)
    K.copy_blocks(ks, vs, none, none)
    K.copy_blocks([], [], none, none)
    assert torch.equal(ks[0], before)
    K.copy_blocks(ks, vs, torch.tensor([2], device=device), torch.tensor([0], device=device))
    assert torch.equal(ks[0][0], before[2])


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_misaligned_pools(device):
    gen = torch.Generator().manual_seed(5)
    ks = [misaligned((4, 3, 1, 5), torch.float16, gen, device) for _ in range(2)]
    vs = [misaligned((4, 3, 1, 5), torch.float16, gen, device) for _ in range(2)]
    src, dst = torch.tensor([0, 1], device=device), torch.tensor([3, 2], device=device)
    ref_k, ref_v = ref_copy_blocks(ks, vs, src, dst)
    K.copy_blocks(ks, vs, src, dst)
    for a, b in zip(ks + vs, ref_k + ref_v):
        assert torch.equal(a, b)


# ============================================================================ gather_kv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_kv_matches_reference(dtype, block_size, head_dim, device):
    gen = torch.Generator().manual_seed(block_size * 100 + head_dim)
    lengths = [0, 1, block_size, 2 * block_size + 1, 13]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 3
    kc = rand((num_blocks, block_size, 2, head_dim), dtype, gen, device)
    vc = rand((num_blocks, block_size, 2, head_dim), dtype, gen, device)
    bt = make_tables(lengths, block_size, num_blocks, gen).to(device)
    lens = torch.tensor(lengths, device=device)
    max_len = max(lengths) + 2  # L > max(lengths): trailing rows must be zeroed
    out_k = torch.full((len(lengths), max_len, 2, head_dim), float("nan"), dtype=dtype, device=device)
    out_v = torch.full_like(out_k, float("nan"))
    K.gather_kv(kc, vc, bt, lens, out_k, out_v)
    assert torch.equal(out_k.cpu(), ref_gather(kc, bt, lens, max_len).cpu())
    assert torch.equal(out_v.cpu(), ref_gather(vc, bt, lens, max_len).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_allocates_and_int64_tables(device):
    gen = torch.Generator().manual_seed(6)
    kc = rand((6, 4, 2, 8), torch.float32, gen, device)
    vc = rand((6, 4, 2, 8), torch.float32, gen, device)
    bt = torch.tensor([[5, 0], [2, -1]], dtype=torch.int64, device=device)
    lens = torch.tensor([7, 3], dtype=torch.int32, device=device)
    out_k, out_v = K.gather_kv(kc, vc, bt, lens)
    assert out_k.shape == (2, 7, 2, 8) and out_k.device == kc.device
    assert torch.equal(out_k, ref_gather(kc, bt, lens, 7)) and torch.equal(out_v, ref_gather(vc, bt, lens, 7))
    out_k, _ = K.gather_kv(kc, vc, bt, lens, max_len=9)
    assert out_k.shape[1] == 9 and torch.equal(out_k, ref_gather(kc, bt, lens, 9))
    empty = K.gather_kv(kc, vc, bt[:0], lens[:0])[0]
    assert empty.shape == (0, 0, 2, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_misaligned_and_strided_tables(device):
    gen = torch.Generator().manual_seed(7)
    kc = misaligned((5, 2, 3, 7), torch.bfloat16, gen, device)
    vc = misaligned((5, 2, 3, 7), torch.bfloat16, gen, device)
    wide = torch.tensor([[4, 9, 1, 9, 3, 9], [0, 9, 2, 9, 9, 9]], dtype=torch.int32, device=device)
    bt = wide[:, ::2]  # non-contiguous block table
    lens = torch.tensor([5, 4], device=device)[[0, 1]]
    out_k, out_v = K.gather_kv(kc, vc, bt, lens)
    assert torch.equal(out_k, ref_gather(kc, bt, lens, 5)) and torch.equal(out_v, ref_gather(vc, bt, lens, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_unchecked_bad_values_are_safe(device):
    gen = torch.Generator().manual_seed(8)
    kc = rand((3, 2, 1, 4), torch.float32, gen, device)
    vc = rand((3, 2, 1, 4), torch.float32, gen, device)
    bt = torch.tensor([[0, 99], [-5, 1], [2, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([4, 3, 1000], device=device)  # 1000: beyond both the table and L
    out_k = torch.full((3, 4, 1, 4), 7.0, device=device)
    out_v = torch.full_like(out_k, 7.0)
    K.gather_kv(kc, vc, bt, lens, out_k, out_v, check_indices=False)
    assert torch.equal(out_k[0, :2], kc[0]) and not out_k[0, 2:].any()  # block 99: absent -> zeros
    assert not out_k[1, :2].any() and torch.equal(out_k[1, 2], kc[1, 0]) and not out_k[1, 3].any()
    assert torch.equal(out_k[2].reshape(-1, 1, 4), torch.cat([kc[2], kc[1]]))  # clamped to 4


@pytest.mark.parametrize("device", DEVICES)
def test_large_calls_take_the_multithreaded_path(device):
    """Sizes above the CPU kernels' threshold for going multi-threaded (8 MiB per call)."""
    gen = torch.Generator().manual_seed(13)
    nb, bs, h, d = 512, 16, 4, 64  # 1 KiB per token row, 16 KiB per block
    kc, vc = rand((nb, bs, h, d), torch.float32, gen, device), rand((nb, bs, h, d), torch.float32, gen, device)
    k_new, v_new = rand((5000, h, d), torch.float32, gen, device), rand((5000, h, d), torch.float32, gen, device)
    slots = torch.randperm(nb * bs, generator=gen)[:5000].to(device)
    ref_k, ref_v = ref_write_kv(kc, vc, k_new, v_new, slots)
    K.write_kv(kc, vc, k_new, v_new, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    perm = torch.randperm(nb, generator=gen).to(device)
    ks, vs = [kc, kc.clone()], [vc, vc.clone()]
    ref_ks, ref_vs = ref_copy_blocks(ks, vs, perm[:160], perm[160:320])
    K.copy_blocks(ks, vs, perm[:160], perm[160:320])
    assert all(torch.equal(a, b) for a, b in zip(ks + vs, ref_ks + ref_vs))
    lengths = [3000, 2048, 1, 1500]
    bt = make_tables(lengths, bs, nb, gen).to(device)
    lens = torch.tensor(lengths, device=device)
    out_k, out_v = K.gather_kv(kc, vc, bt, lens)
    assert torch.equal(out_k, ref_gather(kc, bt, lens, 3000)) and torch.equal(out_v, ref_gather(vc, bt, lens, 3000))
    q = rand((4, 8, d), torch.float32, gen, device)
    out = K.paged_decode_attention(q, kc, vc, bt, lens, 0.125)
    torch.testing.assert_close(out, ref_decode(q, kc, vc, bt, lens, 0.125), atol=1e-5, rtol=1e-5)


# ============================================================================ paged_decode_attention


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=[f"hq{a}-hkv{b}" for a, b in HEAD_CONFIGS])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_matches_reference(dtype, block_size, heads, head_dim, device):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(block_size * 1000 + hq * 100 + head_dim)
    lengths = [0, 1, block_size, 2 * block_size + 1, 37]  # incl. 0 and non-multiples of block_size
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 2
    kc = rand((num_blocks, block_size, hkv, head_dim), dtype, gen, device)
    vc = rand((num_blocks, block_size, hkv, head_dim), dtype, gen, device)
    q = rand((len(lengths), hq, head_dim), dtype, gen, device)
    bt = make_tables(lengths, block_size, num_blocks, gen).to(device)
    lens = torch.tensor(lengths, device=device)
    scale = 1.0 / math.sqrt(head_dim)
    out = K.paged_decode_attention(q, kc, vc, bt, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out[0].any(), "lengths[b] == 0 must give zeros"
    assert_decode_close(out, q, kc, vc, bt, lens, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [1, 7, 128, 256, 512])  # covers every CUDA lane layout
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_head_dims_and_long_sequences(dtype, head_dim, device):
    gen = torch.Generator().manual_seed(head_dim)
    block_size, lengths = 16, [300, 5, 129]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 1
    kc = rand((num_blocks, block_size, 2, head_dim), dtype, gen, device)
    vc = rand((num_blocks, block_size, 2, head_dim), dtype, gen, device)
    q = rand((3, 4, head_dim), dtype, gen, device) * 2  # sharper softmax
    bt = make_tables(lengths, block_size, num_blocks, gen).to(device)
    lens = torch.tensor(lengths, device=device)
    out = K.paged_decode_attention(q, kc, vc, bt, lens)
    assert_decode_close(out, q, kc, vc, bt, lens, 1.0 / math.sqrt(head_dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_strided_q_misaligned_pool_int64_tables(dtype, device):
    gen = torch.Generator().manual_seed(9)
    lengths, block_size, d = [9, 17, 4], 4, 64
    num_blocks = 12
    kc = misaligned((num_blocks, block_size, 2, d), dtype, gen, device)  # forces the scalar CUDA path
    vc = misaligned((num_blocks, block_size, 2, d), dtype, gen, device)
    fused = rand((3, 3, 8, d), dtype, gen, device)
    q = fused[:, 1]  # [B, 8, D] with a batch stride of 3 * 8 * D
    bt = make_tables(lengths, block_size, num_blocks, gen).to(torch.int64).to(device)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out = torch.empty((3, 8, d), dtype=dtype, device=device)
    res = K.paged_decode_attention(q, kc, vc, bt, lens, scale=0.3, out=out)
    assert res is out
    assert_decode_close(out, q, kc, vc, bt, lens, 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_all_empty_and_unchecked_values(device):
    gen = torch.Generator().manual_seed(10)
    kc = rand((4, 2, 1, 8), torch.float32, gen, device)
    vc = rand((4, 2, 1, 8), torch.float32, gen, device)
    q = rand((2, 2, 8), torch.float32, gen, device)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    out = K.paged_decode_attention(q, kc, vc, bt, torch.zeros(2, dtype=torch.int64, device=device))
    assert not out.any()
    # lengths beyond the table are clamped when unchecked
    clamped = K.paged_decode_attention(q, kc, vc, bt, torch.tensor([50, 4], device=device), check_indices=False)
    exact = K.paged_decode_attention(q, kc, vc, bt, torch.tensor([4, 4], device=device))
    torch.testing.assert_close(clamped, exact, atol=0, rtol=0)
    # an out-of-range block id: that block's tokens are absent, nothing is read out of bounds
    bad = torch.tensor([[0, 1000], [2, 3]], dtype=torch.int32, device=device)
    got = K.paged_decode_attention(q, kc, vc, bad, torch.tensor([4, 4], device=device), check_indices=False)
    only_first = K.paged_decode_attention(q, kc, vc, bt, torch.tensor([2, 4], device=device))
    torch.testing.assert_close(got, only_first, atol=1e-6, rtol=1e-6)


def test_decode_default_scale_and_autograd_inputs():
    gen = torch.Generator().manual_seed(11)
    kc = rand((2, 4, 1, 16), torch.float32, gen)
    vc = rand((2, 4, 1, 16), torch.float32, gen)
    q = rand((1, 2, 16), torch.float32, gen).requires_grad_()
    bt = torch.tensor([[1, 0]], dtype=torch.int32)
    lens = torch.tensor([6])
    out = K.paged_decode_attention(q, kc, vc, bt, lens)  # the wrapper detaches
    assert not out.requires_grad
    assert_decode_close(out, q.detach(), kc, vc, bt, lens, 0.25)


@needs_cuda
def test_decode_cuda_head_dim_limit():
    kc = torch.zeros((1, 1, 1, 520), device="cuda")
    q = torch.zeros((1, 1, 520), device="cuda")
    with pytest.raises(ValueError, match="head_dim 520 is not supported"):
        K.paged_decode_attention(q, kc, kc.clone(), torch.zeros((1, 1), dtype=torch.int32, device="cuda"),
                                 torch.ones(1, dtype=torch.int64, device="cuda"))


@needs_cuda
def test_cuda_kernels_are_ordered_on_the_current_stream():
    """Work enqueued on a side stream (torch's current stream there) runs in order with ponder's
    kernels: k_new is filled behind a long sleep on that stream, so a kernel launched on any
    other stream (e.g. the legacy default one) would read k_new before the fill (zeros)."""
    gen = torch.Generator().manual_seed(12)
    kc = rand((8, 16, 2, 64), torch.float16, gen, "cuda")
    vc = rand((8, 16, 2, 64), torch.float16, gen, "cuda")
    q = rand((2, 4, 64), torch.float16, gen, "cuda")
    bt = torch.arange(8, dtype=torch.int32, device="cuda").view(2, 4)
    lens = torch.tensor([60, 33], device="cuda")
    before = K.paged_decode_attention(q, kc, vc, bt, lens)
    src = rand((1, 2, 64), torch.float16, gen, "cuda") * 4
    k_new = torch.zeros_like(src)
    slot = torch.tensor([5], device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        k_new.copy_(src)
        K.write_kv(kc, vc, k_new, k_new, slot, check_indices=False)
        got = K.paged_decode_attention(q, kc, vc, bt, lens, check_indices=False)
        gathered, _ = K.gather_kv(kc, vc, bt, lens, max_len=64, check_indices=False)
    assert not side.query(), "the side stream finished before the sleep could order anything"
    torch.cuda.synchronize()
    assert torch.equal(kc.view(-1, 2, 64)[5], src[0]) and torch.equal(vc.view(-1, 2, 64)[5], src[0])
    assert torch.equal(gathered[0, 5], src[0])
    after = K.paged_decode_attention(q, kc, vc, bt, lens)
    assert torch.equal(got, after) and not torch.equal(got, before)


# ============================================================================ shapes the CUDA paths branch on
# f16/bf16 head_dims that are not a multiple of the 8-element vector (VEC=1 decode, 8/4-byte copy
# units), pools one element off a 16-byte boundary (the VEC=1 variants for every head_dim), GQA
# 8:1, block sizes that are not powers of two, 16k+ token contexts and (CUDA only: 8.6 GB) pools
# over 2^31 elements. Every case runs on the CPU twin too, except the last.


def _write_gather_decode(kc, vc, lengths, hq, gen, device, dtype):
    """Fill the sequences' slots with write_kv, then gather and decode; compare with references."""
    nb, bs, hkv, d = kc.shape
    bt = make_tables(lengths, bs, nb, gen).to(device)
    slots = torch.cat([bt[b, torch.arange(n) // bs].long() * bs + torch.arange(n, device=device) % bs
                       for b, n in enumerate(lengths)]) if sum(lengths) else torch.zeros(0, dtype=torch.int64)
    slots = slots.to(device)
    k_new = rand((len(slots), hkv, d), dtype, gen, device)
    v_new = rand((len(slots), hkv, d), dtype, gen, device)
    ref_k, ref_v = ref_write_kv(kc, vc, k_new, v_new, slots)
    K.write_kv(kc, vc, k_new, v_new, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    lens = torch.tensor(lengths, device=device)
    out_k, out_v = K.gather_kv(kc, vc, bt, lens)
    L = max(lengths)
    assert torch.equal(out_k, ref_gather(kc, bt, lens, L)) and torch.equal(out_v, ref_gather(vc, bt, lens, L))
    q = rand((len(lengths), hq, d), dtype, gen, device)
    scale = 1.0 / math.sqrt(d)
    assert_decode_close(K.paged_decode_attention(q, kc, vc, bt, lens, scale), q, kc, vc, bt, lens, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement", ["aligned", "misaligned"])
@pytest.mark.parametrize("head_dim", [100, 200, 300])  # not multiples of 8: VEC=1 decode on CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_head_dims_off_the_vector_width(dtype, head_dim, placement, device):
    gen = torch.Generator().manual_seed(head_dim + len(placement))
    lengths, bs, hkv = [37, 1, 16], 16, 2
    make = rand if placement == "aligned" else misaligned
    kc = make((8, bs, hkv, head_dim), dtype, gen, device)
    vc = make((8, bs, hkv, head_dim), dtype, gen, device)
    _write_gather_decode(kc, vc, lengths, 4, gen, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [8, 64, 128, 256])  # one VEC=1 layout per lanes-per-token / NV choice
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_pools_take_the_vec1_kernels(dtype, head_dim, device):
    gen = torch.Generator().manual_seed(head_dim + 3)
    kc = misaligned((6, 8, 2, head_dim), dtype, gen, device)
    vc = misaligned((6, 8, 2, head_dim), dtype, gen, device)
    assert kc.data_ptr() % 16 != 0
    _write_gather_decode(kc, vc, [13, 8, 20], 4, gen, device, dtype)
    src = torch.tensor([0, 2], device=device)
    dst = torch.tensor([5, 4], device=device)
    ref_k, ref_v = ref_copy_blocks([kc], [vc], src, dst)
    K.copy_blocks([kc], [vc], src, dst)
    assert torch.equal(kc, ref_k[0]) and torch.equal(vc, ref_v[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [(8, 1), (16, 2), (32, 4)], ids=["gqa8-hq8", "gqa8-hq16", "gqa8-hq32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_gqa_8_to_1(dtype, heads, device):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hq)
    kc = rand((12, 16, hkv, 128), dtype, gen, device)
    vc = rand((12, 16, hkv, 128), dtype, gen, device)
    _write_gather_decode(kc, vc, [70, 1, 33], hq, gen, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [3, 5, 12, 24])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_sizes_not_powers_of_two(dtype, block_size, device):
    gen = torch.Generator().manual_seed(block_size)
    lengths = [1, block_size, 2 * block_size + 1, 41]
    nb = sum(math.ceil(n / block_size) for n in lengths) + 3
    kc = rand((nb, block_size, 2, 24), dtype, gen, device)
    vc = rand((nb, block_size, 2, 24), dtype, gen, device)
    _write_gather_decode(kc, vc, lengths, 4, gen, device, dtype)
    src = torch.tensor([0, 1], device=device)
    dst = torch.tensor([nb - 1, nb - 2], device=device)
    ref_k, ref_v = ref_copy_blocks([kc], [vc], src, dst)
    K.copy_blocks([kc], [vc], src, dst)
    assert torch.equal(kc, ref_k[0]) and torch.equal(vc, ref_v[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_contexts_of_16k_tokens_and_more(dtype, device):
    gen = torch.Generator().manual_seed(16384)
    lengths, bs = [16384 + 7, 20000, 1], 16
    nb = sum(math.ceil(n / bs) for n in lengths) + 1
    kc = rand((nb, bs, 1, 64), dtype, gen, device)
    vc = rand((nb, bs, 1, 64), dtype, gen, device)
    q = rand((3, 8, 64), dtype, gen, device) * 3  # sharp enough that a few keys dominate
    bt = make_tables(lengths, bs, nb, gen).to(device)
    lens = torch.tensor(lengths, device=device)
    out = K.paged_decode_attention(q, kc, vc, bt, lens)
    assert_decode_close(out, q, kc, vc, bt, lens, 1.0 / 8.0)


@needs_cuda
def test_cuda_pool_over_2_31_elements():
    """Element offsets past 2^31 - 1 (a 32-bit overflow would write/read the wrong rows)."""
    bs, hkv, d = 16, 8, 128
    nb = 2**31 // (bs * hkv * d) + 8  # 131080 blocks: 2^31 + 131072 elements per pool
    try:
        kc = torch.empty((nb, bs, hkv, d), dtype=torch.float16, device="cuda")
        vc = torch.empty_like(kc)
    except torch.OutOfMemoryError:
        pytest.fail("a 2 x 4.3 GB pool must fit on the test GPU")
    try:
        assert kc.numel() > 2**31
        gen = torch.Generator().manual_seed(31)
        high = torch.arange(nb - 6, nb, device="cuda")  # blocks past element 2^31
        low = torch.tensor([0, 1], device="cuda")
        for blocks in (high, low):
            kc[blocks] = rand((len(blocks), bs, hkv, d), torch.float16, gen, "cuda")
            vc[blocks] = rand((len(blocks), bs, hkv, d), torch.float16, gen, "cuda")
        slots = torch.tensor([(nb - 1) * bs + 15, (nb - 2) * bs, 3], device="cuda")
        k_new = rand((3, hkv, d), torch.float16, gen, "cuda")
        K.write_kv(kc, vc, k_new, k_new * 2, slots)
        flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
        assert torch.equal(flat_k[slots], k_new) and torch.equal(flat_v[slots], k_new * 2)
        K.copy_blocks([kc], [vc], torch.tensor([0, nb - 3], device="cuda"), torch.tensor([nb - 4, 1], device="cuda"))
        assert torch.equal(kc[nb - 4], kc[0]) and torch.equal(vc[1], vc[nb - 3])
        bt = torch.tensor([[nb - 6, nb - 5, nb - 4, nb - 3], [nb - 2, nb - 1, 0, 1]], dtype=torch.int32, device="cuda")
        lens = torch.tensor([64, 50], device="cuda")
        out_k, out_v = K.gather_kv(kc, vc, bt, lens)
        assert torch.equal(out_k, ref_gather(kc, bt, lens, 64)) and torch.equal(out_v, ref_gather(vc, bt, lens, 64))
        q = rand((2, 16, d), torch.float16, gen, "cuda")
        out = K.paged_decode_attention(q, kc, vc, bt, lens)
        assert_decode_close(out, q, kc, vc, bt, lens, 1.0 / math.sqrt(d))
    finally:
        del kc, vc
        torch.cuda.empty_cache()


# ============================================================================ DLPack inputs beyond torch


def test_numpy_arrays_work_through_dlpack():
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((4, 2, 2, 8)).astype(np.float32)
    vc = rng.standard_normal((4, 2, 2, 8)).astype(np.float32)
    k_new = rng.standard_normal((3, 8, 2)).astype(np.float32).transpose(0, 2, 1)  # strided
    slots = np.array([7, -1, 0], dtype=np.int64)
    expect_k, expect_v = ref_write_kv(torch.from_numpy(kc), torch.from_numpy(vc), torch.from_numpy(k_new.copy()),
                                      torch.from_numpy(k_new.copy()), torch.from_numpy(slots))
    _core.write_kv(kc, vc, k_new, k_new, slots)
    assert np.array_equal(kc, expect_k.numpy()) and np.array_equal(vc, expect_v.numpy())
    bt = np.array([[3, 0], [1, 2]], dtype=np.int32)
    lens = np.array([4, 1], dtype=np.int64)
    ok, ov = np.empty((2, 4, 2, 8), np.float32), np.empty((2, 4, 2, 8), np.float32)
    _core.gather_kv(kc, vc, bt, lens, ok, ov)
    assert np.array_equal(ok, ref_gather(torch.from_numpy(kc), torch.from_numpy(bt), torch.from_numpy(lens), 4).numpy())
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    out = np.empty_like(q)
    _core.paged_decode_attention(out, q, kc, vc, bt, lens, 0.5, stream=1234)  # stream: ignored on the CPU
    ref = ref_decode(torch.from_numpy(q), torch.from_numpy(kc), torch.from_numpy(vc), torch.from_numpy(bt),
                     torch.from_numpy(lens), 0.5)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-5)
    read_only_k = k_new.copy()
    read_only_k.flags.writeable = False  # inputs may be read-only
    _core.write_kv(kc, vc, read_only_k, read_only_k, slots)


def test_legacy_dlpack_producers_work():
    """Capsules named "dltensor" from a producer whose __dlpack__ takes no max_version."""
    rng = np.random.default_rng(1)
    kc = np.zeros((2, 4, 1, 3), np.float32)
    vc = np.zeros((2, 4, 1, 3), np.float32)
    k_new = rng.standard_normal((2, 1, 3)).astype(np.float32)
    slots = np.array([5, 2], dtype=np.int64)
    _core.write_kv(FakeDLPack.of(kc), FakeDLPack.of(vc), FakeDLPack.of(k_new), FakeDLPack.of(k_new),
                   FakeDLPack.of(slots))
    assert np.array_equal(kc.reshape(8, 1, 3)[[5, 2]], k_new) and np.array_equal(vc, kc)


def test_import_ponder_does_not_import_torch():
    code = "import sys, ponder, ponder.hf.kernels; assert 'torch' not in sys.modules, 'torch was imported'"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(ponder.__file__))] + sys.path)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ============================================================================ bad input


def _write_args(**over):
    gen = torch.Generator().manual_seed(0)
    args = dict(
        k_cache=rand((4, 2, 2, 8), torch.float32, gen),
        v_cache=rand((4, 2, 2, 8), torch.float32, gen),
        k_new=rand((3, 2, 8), torch.float32, gen),
        v_new=rand((3, 2, 8), torch.float32, gen),
        slot_mapping=torch.tensor([0, 5, -1]),
    )
    args.update(over)
    return args


def _noncontig_cache(dtype=torch.float32):
    return torch.zeros((4, 2, 2, 10), dtype=dtype)[..., :8]


FAKE_CUDA = dict(device=(2, 0))

WRITE_BAD = {
    "k_cache 3-D": (dict(k_cache=torch.zeros((4, 2, 16))), "k_cache must be a 4-D tensor"),
    "k_cache non-contiguous": (dict(k_cache=_noncontig_cache()), "k_cache must be contiguous"),
    "k_cache int": (dict(k_cache=torch.zeros((4, 2, 2, 8), dtype=torch.int32)), "k_cache has dtype int32; it must be float"),
    "k_cache float64": (dict(k_cache=torch.zeros((4, 2, 2, 8), dtype=torch.float64)), "k_cache has dtype float64"),
    "block_size 0": (dict(k_cache=torch.zeros((4, 0, 2, 8)), v_cache=torch.zeros((4, 0, 2, 8))), "block_size 0"),
    "v_cache shape": (dict(v_cache=torch.zeros((5, 2, 2, 8))), r"v_cache has shape \[5, 2, 2, 8\] but k_cache"),
    "v_cache dtype": (dict(v_cache=torch.zeros((4, 2, 2, 8), dtype=torch.float16)), "v_cache has dtype float16 but k_cache"),
    "k_new dtype": (dict(k_new=torch.zeros((3, 2, 8), dtype=torch.bfloat16)), "k_new has dtype bfloat16 but k_cache"),
    "k_new 2-D": (dict(k_new=torch.zeros((3, 16))), "k_new must be a 3-D tensor"),
    "k_new heads": (dict(k_new=torch.zeros((3, 3, 8))), "k_new has shape .*num_kv_heads"),
    "k_new head_dim": (dict(k_new=torch.zeros((3, 2, 4))), "k_new has shape .*head_dim"),
    "v_new shape": (dict(v_new=torch.zeros((2, 2, 8))), "v_new has shape .* but k_new"),
    "slots float": (dict(slot_mapping=torch.zeros(3)), "slot_mapping has dtype float32; it must be int32 or int64"),
    "slots int16": (dict(slot_mapping=torch.zeros(3, dtype=torch.int16)), "slot_mapping has dtype int16"),
    "slots 2-D": (dict(slot_mapping=torch.zeros((3, 1), dtype=torch.int64)), "slot_mapping must be a 1-D tensor"),
    "slots length": (dict(slot_mapping=torch.zeros(4, dtype=torch.int64)), "slot_mapping has shape .*num_tokens"),
    "slot out of range": (dict(slot_mapping=torch.tensor([0, 8, -1])), r"slot_mapping\[1\] = 8 is out of range"),
    "slot repeated": (dict(slot_mapping=torch.tensor([3, -1, 3])), r"slot_mapping\[2\] = 3 repeats slot_mapping\[0\]"),
    "k and v same memory": ("same", "are the same memory"),
    "requires grad": (dict(k_new=torch.zeros((3, 2, 8), requires_grad=True)), r"k_new requires grad: pass k_new.detach\(\)"),
    "not a tensor": (dict(slot_mapping=[0, 1, 2]), "slot_mapping must be a tensor or array that supports DLPack"),
    "None": (dict(k_new=None), "k_new must be a tensor .* got None"),
    "numpy float64": (dict(k_new=np.zeros((3, 2, 8))), "k_new has dtype float64"),
    "read-only output": (dict(k_cache="readonly"), "k_cache is read-only"),
    "other device": (dict(slot_mapping=FakeDLPack((3,), code=(0, 64), **FAKE_CUDA)), "slot_mapping is on cuda:0 but k_cache is on cpu"),
    "unsupported device": (dict(k_new=FakeDLPack((3, 2, 8), device=(4, 0))), "k_new is on an unsupported device"),
    "vector dtype": (dict(k_new=FakeDLPack((3, 2, 8), lanes=4)), r"k_new has dtype float32 x4"),
}


@pytest.mark.parametrize("case", list(WRITE_BAD))
def test_write_kv_rejects(case):
    over, match = WRITE_BAD[case]
    if over == "same":
        pool = torch.zeros((4, 2, 2, 8))
        args = _write_args(k_cache=pool, v_cache=pool)
    elif over.get("k_cache") == "readonly":
        ro = np.zeros((4, 2, 2, 8), np.float32)
        ro.flags.writeable = False
        args = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in _write_args().items()}
        args["k_cache"] = ro
    else:
        args = _write_args(**over)
    before = args["k_cache"].clone() if isinstance(args["k_cache"], torch.Tensor) else None
    with pytest.raises(ValueError, match=match):
        _core.write_kv(**args)
    if before is not None:
        assert torch.equal(args["k_cache"], before), "a rejected call must not write"


def test_bad_dlpack_producers():
    class NotACapsule:
        def __dlpack__(self, **kw):
            return 42

    class Raises:
        def __dlpack__(self, **kw):
            raise BufferError("nope")

    with pytest.raises(ValueError, match="did not return a PyCapsule"):
        _core.write_kv(**_write_args(k_new=NotACapsule()))
    with pytest.raises(ValueError, match="k_new cannot be exported through DLPack: .*nope"):
        _core.write_kv(**_write_args(k_new=Raises()))
    with pytest.raises(ValueError, match="conj|complex"):
        c = torch.zeros((3, 2, 8), dtype=torch.complex64).conj()
        _core.write_kv(**_write_args(k_new=c))


def _copy_args(**over):
    args = dict(
        k_caches=[torch.zeros((6, 2, 1, 4)) for _ in range(2)],
        v_caches=[torch.zeros((6, 2, 1, 4)) for _ in range(2)],
        src=torch.tensor([0, 1]),
        dst=torch.tensor([2, 3]),
    )
    args.update(over)
    return args


COPY_BAD = {
    "single tensor": (dict(k_caches=torch.zeros((6, 2, 1, 4))), "k_caches must be a list of tensors .*single tensor"),
    "not a list": (dict(v_caches={"a": 1}), "v_caches must be a list or tuple"),
    "list lengths": (dict(v_caches=[torch.zeros((6, 2, 1, 4))]), "same length .* got 2 and 1"),
    "layer shape": (dict(k_caches=[torch.zeros((6, 2, 1, 4)), torch.zeros((7, 2, 1, 4))]), r"k_caches\[1\] has shape"),
    "layer dtype": (dict(k_caches=[torch.zeros((6, 2, 1, 4)), torch.zeros((6, 2, 1, 4), dtype=torch.float16)]),
                    r"v_caches\[1\] has dtype float32 but k_caches\[1\]"),
    "layer non-contiguous": (dict(v_caches=[torch.zeros((6, 2, 1, 4)), torch.zeros((6, 2, 1, 6))[..., :4]]),
                             r"v_caches\[1\] must be contiguous"),
    "element not a tensor": (dict(k_caches=[torch.zeros((6, 2, 1, 4)), 3]), r"k_caches\[1\] must be a tensor"),
    "src/dst lengths": (dict(dst=torch.tensor([2])), "src and dst must have the same length"),
    "src float": (dict(src=torch.tensor([0.0, 1.0])), "src has dtype float32"),
    "dst 2-D": (dict(dst=torch.tensor([[2, 3]])), "dst must be a 1-D tensor"),
    "src out of range": (dict(src=torch.tensor([0, 6])), r"src\[1\] = 6 is out of range \[0, 6\)"),
    "dst negative": (dict(dst=torch.tensor([-1, 3])), r"dst\[0\] = -1 is out of range"),
    "dst repeated": (dict(dst=torch.tensor([4, 4])), r"dst\[1\] = 4 repeats dst\[0\]"),
    "src is a dst": (dict(src=torch.tensor([0, 2])), r"block 2 is both a source \(src\[1\]\) and a destination \(dst\[0\]\)"),
    "requires grad": (dict(src=torch.tensor([0.0, 1.0], requires_grad=True)), "src requires grad"),
}


@pytest.mark.parametrize("case", list(COPY_BAD))
def test_copy_blocks_rejects(case):
    over, match = COPY_BAD[case]
    with pytest.raises(ValueError, match=match):
        _core.copy_blocks(**_copy_args(**over))


def _gather_args(**over):
    args = dict(
        k_cache=torch.zeros((5, 4, 2, 8)),
        v_cache=torch.zeros((5, 4, 2, 8)),
        block_tables=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
        lengths=torch.tensor([6, 3]),
        out_k=torch.zeros((2, 6, 2, 8)),
        out_v=torch.zeros((2, 6, 2, 8)),
    )
    args.update(over)
    return args


GATHER_BAD = {
    "tables float": (dict(block_tables=torch.zeros((2, 2))), "block_tables has dtype float32"),
    "tables 1-D": (dict(block_tables=torch.zeros(2, dtype=torch.int32)), "block_tables must be a 2-D tensor"),
    "lengths batch": (dict(lengths=torch.tensor([6, 3, 1])), "lengths has shape .*batch"),
    "lengths 2-D": (dict(lengths=torch.tensor([[6, 3]])), "lengths must be a 1-D tensor"),
    "out_k batch": (dict(out_k=torch.zeros((3, 6, 2, 8))), "out_k has shape .*batch"),
    "out_k heads": (dict(out_k=torch.zeros((2, 6, 1, 8))), "out_k has shape .*num_kv_heads"),
    "out_v shape": (dict(out_v=torch.zeros((2, 7, 2, 8))), "out_v has shape .* but out_k"),
    "out_k dtype": (dict(out_k=torch.zeros((2, 6, 2, 8), dtype=torch.float16)), "out_k has dtype float16 but k_cache"),
    "out_k non-contiguous": (dict(out_k=torch.zeros((2, 6, 2, 9))[..., :8]), "out_k must be contiguous"),
    "out_k is out_v": ("same", "out_k and out_v are the same memory"),
    "length > L": (dict(lengths=torch.tensor([7, 3]), block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)),
                   r"lengths\[0\] = 7 exceeds the output's max_len"),
    "length > table": (dict(lengths=torch.tensor([6, 9]), out_k=torch.zeros((2, 9, 2, 8)), out_v=torch.zeros((2, 9, 2, 8))),
                       r"lengths\[1\] = 9 exceeds what its block table row holds: max_blocks 2 x block_size 4 = 8"),
    "negative length": (dict(lengths=torch.tensor([-1, 3])), r"lengths\[0\] = -1 is negative"),
    "block id": (dict(block_tables=torch.tensor([[0, 5], [2, -1]], dtype=torch.int32)),
                 r"block_tables\[0, 1\] = 5 is out of range \[0, 5\)"),
    "unused -1 but used": (dict(lengths=torch.tensor([6, 5])), r"lengths\[1\] = 5 exceeds|block_tables\[1, 1\] = -1"),
    "devices": (dict(lengths=FakeDLPack((2,), code=(0, 64), **FAKE_CUDA)), "lengths is on cuda:0 but k_cache is on cpu"),
}


@pytest.mark.parametrize("case", list(GATHER_BAD))
def test_gather_kv_rejects(case):
    over, match = GATHER_BAD[case]
    if over == "same":
        out = torch.zeros((2, 6, 2, 8))
        args = _gather_args(out_k=out, out_v=out)
    else:
        args = _gather_args(**over)
    with pytest.raises(ValueError, match=match):
        _core.gather_kv(**args)


def _decode_args(**over):
    args = dict(
        out=torch.zeros((2, 4, 8)),
        q=torch.zeros((2, 4, 8)),
        k_cache=torch.zeros((5, 4, 2, 8)),
        v_cache=torch.zeros((5, 4, 2, 8)),
        block_tables=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
        lengths=torch.tensor([6, 3]),
        scale=0.5,
    )
    args.update(over)
    return args


DECODE_BAD = {
    "gqa ratio": (dict(q=torch.zeros((2, 3, 8)), out=torch.zeros((2, 3, 8))), "q has 3 heads, not a multiple of the 2 kv heads"),
    "q head_dim": (dict(q=torch.zeros((2, 4, 4))), "q has shape .*head_dim"),
    "q 4-D": (dict(q=torch.zeros((2, 1, 4, 8))), "q must be a 3-D tensor"),
    "q dtype": (dict(q=torch.zeros((2, 4, 8), dtype=torch.bfloat16)), "q has dtype bfloat16 but k_cache"),
    "out shape": (dict(out=torch.zeros((2, 8, 8))), "out has shape .* but q"),
    "out dtype": (dict(out=torch.zeros((2, 4, 8), dtype=torch.float16)), "out has dtype float16 but q"),
    "out non-contiguous": (dict(out=torch.zeros((2, 8, 4)).transpose(1, 2)), "out must be contiguous"),
    "out requires grad": (dict(out=torch.zeros((2, 4, 8), requires_grad=True)), r"out requires grad: pass out.detach\(\)"),
    "scale nan": (dict(scale=float("nan")), "scale must be a finite"),
    "scale inf": (dict(scale=float("inf")), "scale must be a finite"),
    "scale huge": (dict(scale=1e39), "scale must be a finite float32"),
    "tables batch": (dict(block_tables=torch.zeros((3, 2), dtype=torch.int32)), "block_tables has shape .*batch"),
    "lengths dtype": (dict(lengths=torch.tensor([6.0, 3.0])), "lengths has dtype float32"),
    "length > table": (dict(lengths=torch.tensor([9, 3])), r"lengths\[0\] = 9 exceeds what its block table row holds"),
    "block id": (dict(block_tables=torch.tensor([[0, 1], [7, -1]], dtype=torch.int32)), r"block_tables\[1, 0\] = 7"),
    "zero kv heads": (dict(k_cache=torch.zeros((5, 4, 0, 8)), v_cache=torch.zeros((5, 4, 0, 8))), "num_kv_heads 0"),
    "cache non-contiguous": (dict(v_cache=torch.zeros((5, 4, 2, 9))[..., :8]), "v_cache must be contiguous"),
}


@pytest.mark.parametrize("case", list(DECODE_BAD))
def test_decode_rejects(case):
    over, match = DECODE_BAD[case]
    with pytest.raises(ValueError, match=match):
        _core.paged_decode_attention(**_decode_args(**over))


@pytest.mark.skipif(CUDA_OK, reason="fake CUDA pointers must never reach a real device")
@pytest.mark.skipif(CUDA_OK, reason="with a usable GPU the fake device addresses would reach real kernels")
def test_cuda_tensors_without_usable_cuda_raise_runtime_error():
    """CUDA tensors in a build without CUDA (or on a machine without a GPU): RuntimeError, no crash."""
    addresses = iter(range(0x100000, 0x10000000, 0x100000))

    def fake(shape, code=(2, 32)):  # distinct fake device addresses
        return FakeDLPack(shape, code=code, device=(2, 0), data=next(addresses))

    kc, vc = fake((4, 2, 1, 8)), fake((4, 2, 1, 8))
    kn = fake((3, 1, 8))
    slots = fake((3,), code=(0, 64))
    match = "built without CUDA" if not ponder.build_info()["cuda"] else None
    for check in (True, False):
        with pytest.raises(RuntimeError, match=match):
            _core.write_kv(kc, vc, kn, kn, slots, check_indices=check)
        with pytest.raises(RuntimeError, match=match):
            _core.copy_blocks([kc], [vc], slots, slots, check_indices=check)
    bt = fake((3, 2), code=(0, 32))
    with pytest.raises(RuntimeError, match=match):
        _core.gather_kv(kc, vc, bt, slots, fake((3, 2, 1, 8)), fake((3, 2, 1, 8)))
    with pytest.raises(RuntimeError, match=match):
        _core.paged_decode_attention(fake((3, 2, 8)), fake((3, 2, 8)), kc, vc, bt, slots, 1.0)


def test_wrapper_argument_errors():
    with pytest.raises(ValueError, match="pass both out_k and out_v"):
        K.gather_kv(torch.zeros((1, 1, 1, 1)), torch.zeros((1, 1, 1, 1)), torch.zeros((1, 1), dtype=torch.int32),
                    torch.zeros(1, dtype=torch.int64), out_k=torch.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="k_cache must be a torch.Tensor"):
        K.write_kv([1], None, None, None, None)


# ============================================================================ callers: ponder.hf.kv


def _spy(monkeypatch, name, calls, run=True):
    """Replace ponder.hf.kernels.<name> by a recorder (and, if run, the real kernel)."""
    real = getattr(K, name)

    def spy(*args, **kwargs):
        calls.append((name, args, kwargs))
        if run:
            return real(*args, **kwargs)

    monkeypatch.setattr(K, name, spy)


def _forked_cache(device):
    """A 1-layer cache with one 6-token sequence (blocks of 4) forked twice: the next append of
    each fork copies the shared partial block (copy-on-write)."""
    from ponder.hf.kv import KVSpec, PagedKVCache

    cache = PagedKVCache(KVSpec(num_layers=2, num_kv_heads=2, head_dim=8), num_blocks=8, block_size=4, device=device)
    seq, _ = cache.new_sequence([1, 2, 3, 4, 5, 6])
    return cache, seq


def test_copy_on_write_indices_follow_the_pools_device(monkeypatch):
    """Issue 20: CoW src/dst were built on the CPU whatever the pools' device. Pools on the 'meta'
    device stand in for CUDA here: any CPU index tensor handed to a kernel wrapper is the bug."""
    calls = []
    for name in ("copy_blocks", "write_kv", "gather_kv", "paged_decode_attention"):
        _spy(monkeypatch, name, calls, run=False)
    cache, seq = _forked_cache("meta")
    cache.prepare([seq], [[1, 2, 3, 4, 5, 6]])
    forks = [int(s) for s in cache.fork(seq, 2)]
    batch = cache.prepare(forks, [[7], [8]])
    copies = [c for c in calls if c[0] == "copy_blocks"]
    assert len(copies) == 1, calls
    k_pools, v_pools, src, dst = copies[0][1]
    assert {p.device.type for p in (*k_pools, *v_pools)} == {"meta"}
    assert src.device.type == dst.device.type == "meta"
    assert len(src) == len(dst) >= 1
    for t in (batch.slot_mapping, batch.block_tables, batch.kv_lens, batch.input_ids):
        assert t.device.type == "meta"


def test_copy_on_write_runs_on_cpu_pools_and_companions():
    """The same path with real CPU pools: the forks' partial block is copied in every pool."""
    cache, seq = _forked_cache("cpu")
    from ponder.hf.kv import KVSpec

    twin = cache.__class__(KVSpec(2, 2, 8), num_blocks=8, block_size=4, manager=cache.manager)
    cache._companions.append(twin)  # what companion(model) does, without a model
    twin._primary = cache
    cache.prepare([seq], [[1, 2, 3, 4, 5, 6]])
    for pools in (cache, twin):
        for layer in pools.k:
            layer[1].fill_(3.0)  # the sequence's partial second block
    forks = [int(s) for s in cache.fork(seq, 2)]
    cache.prepare(forks, [[7], [8]])
    tables, _ = cache.manager.block_table(np.asarray(forks))
    copied = {int(r[1]) for r in tables} - {1}
    assert copied, tables
    for pools in (cache, twin):
        for layer in pools.k:
            for b in copied:
                assert (layer[b] == 3.0).all()


def test_forward_pass_checks_indices_once_per_batch(monkeypatch):
    """prepare() checks the batch's indices on the host; update() and paged attention then run
    every layer's kernel without check_indices (no host copy + sync per layer on CUDA), with
    index tensors on the pools' device."""
    from ponder.hf.kv import paged_attention

    calls = []
    for name in ("write_kv", "gather_kv", "paged_decode_attention"):
        _spy(monkeypatch, name, calls)
    cache, seq = _forked_cache("cpu")
    gen = torch.Generator().manual_seed(0)
    for tokens, decode in (([1, 2, 3, 4, 5, 6], False), ([7], True)):
        batch = cache.prepare([seq], [tokens])
        assert batch.indices_checked and batch.decode == decode
        T = len(tokens)
        for layer in range(2):
            k = torch.randn((1, 2, T, 8), generator=gen)
            cache.update(k, k.clone(), layer, kwargs={"ponder_batch": batch})
            module = type("Attn", (), {"layer_idx": layer})()
            out, _ = paged_attention(module, torch.randn((1, 4, T, 8), generator=gen), k, k, None, ponder_batch=batch)
            assert out.shape == (1, T, 4, 8) and torch.isfinite(out).all()
    names = [c[0] for c in calls]
    assert names.count("write_kv") == 4 and names.count("gather_kv") == 2 and names.count("paged_decode_attention") == 2
    for _, args, kwargs in calls:
        assert kwargs.get("check_indices") is False
        assert all(a.device == cache.device for a in args if isinstance(a, torch.Tensor))


def test_check_batch_indices():
    """The host-side batch check applies the kernels' index rules."""
    K.check_batch_indices(4, 2, slot_mapping=np.array([0, 7, -1, -1]))
    K.check_batch_indices(4, 2, block_tables=np.array([[3, -1], [0, 1]]), lengths=np.array([2, 4]))
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 8 is out of range"):
        K.check_batch_indices(4, 2, slot_mapping=np.array([0, 8]))
    with pytest.raises(ValueError, match="slot 3 is given twice"):
        K.check_batch_indices(4, 2, slot_mapping=np.array([3, -1, 3]))
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] = -1 is out of range"):
        K.check_batch_indices(4, 2, block_tables=np.array([[3, -1]]), lengths=np.array([3]))
    with pytest.raises(ValueError, match=r"lengths\[0\] = 5 is outside \[0, 4\]"):
        K.check_batch_indices(4, 2, block_tables=np.array([[3, 1]]), lengths=np.array([5]))
    with pytest.raises(ValueError, match="both block_tables and lengths"):
        K.check_batch_indices(4, 2, block_tables=np.array([[3, 1]]))
