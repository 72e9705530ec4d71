#!/usr/bin/env python3
"""Benchmark the paged KV-cache kernels (ponder.hf.kernels) against plain torch equivalents.

For each of write_kv, copy_blocks, gather_kv and paged_decode_attention it times ponder's
kernel and a vectorised torch implementation of the same operation on the same inputs, checks
that both give the same result (bit-exact for data movement, allclose for attention), and
reports medians, the speed ratio and, on CUDA, the achieved memory bandwidth against the
device's peak (H200: 4.8 TB/s; looked up from the device name, override with --peak-gbs).

    python benchmarks/bench_kernels.py                     # CUDA if available, else CPU
    python benchmarks/bench_kernels.py --device cpu --quick
    python benchmarks/bench_kernels.py --device cuda --dtype bf16 --json --out bench-results/kernels.json

Timing: warm-up calls first; CUDA times come from torch.cuda.Event pairs around a batch of
calls (per-call time = batch time / calls, median over trials), so tiny kernels include their
launch cost; CPU times are time.perf_counter medians. Inputs and outputs are allocated once,
outside the timed region; index checks are off (check_indices=False) in the timed calls.
Bytes counted per call (for GB/s) are the bytes a perfect kernel must move: reads + writes of
K/V rows, ignoring the small index tensors. Exit status 1 when ponder and torch disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

try:
    import ponder
except ModuleNotFoundError:  # not installed: use this checkout's python/ directory
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
    import ponder

import torch

from ponder import _core

# Peak DRAM bandwidth in GB/s by device-name fragment (first match wins; more specific first).
PEAK_GBS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def device_peak_gbs(device: torch.device) -> tuple[str, float | None]:
    props = torch.cuda.get_device_properties(device)
    for frag, gbs in PEAK_GBS:
        if frag in props.name:
            return props.name, gbs
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:  # double data rate
        return props.name, 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return props.name, None


# ----------------------------------------------------------------------------- workloads


def workloads(quick: bool, device: str):
    """(name, op, config) triples; sizes sized for the device kind."""
    gpu = device == "cuda"
    if gpu and not quick:
        return [
            ("write_kv", dict(tokens=256, blocks=4096, bs=16, hkv=8, d=128)),  # a decode step
            ("write_kv", dict(tokens=8192, blocks=4096, bs=16, hkv=8, d=128)),  # a prefill chunk
            ("copy_blocks", dict(layers=32, pairs=256, blocks=1024, bs=16, hkv=8, d=128)),
            ("gather_kv", dict(batch=32, length=2048, blocks=4096, bs=16, hkv=8, d=128)),
            ("decode", dict(batch=64, length=4096, blocks=16384 + 64, bs=16, hq=32, hkv=8, d=128)),
            ("decode", dict(batch=256, length=1024, blocks=16384 + 64, bs=16, hq=32, hkv=8, d=128)),
            ("decode", dict(batch=8, length=8192, blocks=4096 + 64, bs=16, hq=32, hkv=32, d=128)),
        ]
    if gpu:
        return [
            ("write_kv", dict(tokens=1024, blocks=1024, bs=16, hkv=8, d=128)),
            ("copy_blocks", dict(layers=8, pairs=128, blocks=512, bs=16, hkv=8, d=128)),
            ("gather_kv", dict(batch=16, length=1024, blocks=1024, bs=16, hkv=8, d=128)),
            ("decode", dict(batch=32, length=2048, blocks=4096 + 64, bs=16, hq=32, hkv=8, d=128)),
        ]
    scale = 1 if quick else 2
    return [
        ("write_kv", dict(tokens=256 * scale, blocks=256, bs=16, hkv=8, d=128)),
        ("copy_blocks", dict(layers=4 * scale, pairs=32, blocks=128, bs=16, hkv=8, d=128)),
        ("gather_kv", dict(batch=4 * scale, length=512, blocks=512, bs=16, hkv=8, d=128)),
        ("decode", dict(batch=4 * scale, length=512, blocks=512, bs=16, hq=32, hkv=8, d=128)),
    ]


def make_tables(batch, length, bs, blocks, device, gen):
    per = math.ceil(length / bs)
    assert batch * per <= blocks, "pool too small for the workload"
    ids = torch.randperm(blocks, generator=gen)[: batch * per].view(batch, per).to(torch.int32)
    lengths = torch.full((batch,), length, dtype=torch.int64)
    lengths[::3] = max(1, length - bs // 2 - 1)  # some ragged lengths
    return ids.to(device), lengths.to(device)


def setup(op, cfg, dtype, device, gen):
    """Returns (ponder_fn, torch_fn, compare_fn, bytes_per_call); fns take no arguments."""
    es = torch.tensor([], dtype=dtype).element_size()
    dev = torch.device(device)
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0

    def pool(shape):
        return torch.randn(shape, generator=gen).to(dtype).to(dev)

    if op == "write_kv":
        t, nb, bs, h, d = cfg["tokens"], cfg["blocks"], cfg["bs"], cfg["hkv"], cfg["d"]
        kc, vc = pool((nb, bs, h, d)), pool((nb, bs, h, d))
        kc2, vc2 = kc.clone(), vc.clone()
        k_new, v_new = pool((t, h, d)), pool((t, h, d))
        slots = torch.randperm(nb * bs, generator=gen)[:t].to(dev)

        def run():
            _core.write_kv(kc, vc, k_new, v_new, slots, stream=stream, check_indices=False)

        def ref():
            kc2.view(-1, h, d)[slots] = k_new
            vc2.view(-1, h, d)[slots] = v_new

        def same():
            return torch.equal(kc, kc2) and torch.equal(vc, vc2)

        return run, ref, same, 2 * 2 * t * h * d * es

    if op == "copy_blocks":
        layers, m, nb, bs, h, d = cfg["layers"], cfg["pairs"], cfg["blocks"], cfg["bs"], cfg["hkv"], cfg["d"]
        ks = [pool((nb, bs, h, d)) for _ in range(layers)]
        vs = [pool((nb, bs, h, d)) for _ in range(layers)]
        ks2, vs2 = [k.clone() for k in ks], [v.clone() for v in vs]
        perm = torch.randperm(nb, generator=gen)
        src, dst = perm[:m].to(dev), perm[m : 2 * m].to(dev)

        def run():
            _core.copy_blocks(ks, vs, src, dst, stream=stream, check_indices=False)

        def ref():
            for k, v in zip(ks2, vs2):
                k[dst] = k[src]
                v[dst] = v[src]

        def same():
            return all(torch.equal(a, b) for a, b in zip(ks + vs, ks2 + vs2))

        return run, ref, same, 2 * 2 * layers * m * bs * h * d * es

    if op == "gather_kv":
        b, length, nb, bs, h, d = cfg["batch"], cfg["length"], cfg["blocks"], cfg["bs"], cfg["hkv"], cfg["d"]
        kc, vc = pool((nb, bs, h, d)), pool((nb, bs, h, d))
        bt, lens = make_tables(b, length, bs, nb, dev, gen)
        out_k = torch.empty((b, length, h, d), dtype=dtype, device=dev)
        out_v = torch.empty_like(out_k)
        t = torch.arange(length, device=dev)
        slot = (bt[:, t // bs].long() * bs + t % bs).clamp_min(0)  # [B, L]
        valid = (t[None, :] < lens[:, None])[..., None, None]
        ref_out = {}

        def run():
            _core.gather_kv(kc, vc, bt, lens, out_k, out_v, stream=stream, check_indices=False)

        def ref():
            ref_out["k"] = torch.where(valid, kc.view(-1, h, d)[slot], 0)
            ref_out["v"] = torch.where(valid, vc.view(-1, h, d)[slot], 0)

        def same():
            return torch.equal(out_k, ref_out["k"]) and torch.equal(out_v, ref_out["v"])

        moved = int(lens.sum()) * h * d * es * 2 + b * length * h * d * es * 2  # reads + writes
        return run, ref, same, moved

    if op == "decode":
        b, length, nb, bs = cfg["batch"], cfg["length"], cfg["blocks"], cfg["bs"]
        hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
        kc, vc = pool((nb, bs, hkv, d)), pool((nb, bs, hkv, d))
        bt, lens = make_tables(b, length, bs, nb, dev, gen)
        q = pool((b, hq, d))
        out = torch.empty_like(q)
        scale = 1.0 / math.sqrt(d)
        t = torch.arange(length, device=dev)
        slot = (bt[:, t // bs].long() * bs + t % bs).clamp_min(0)
        mask = t[None, :] < lens[:, None]  # [B, L]
        ref_out = {}

        def run():
            _core.paged_decode_attention(out, q, kc, vc, bt, lens, scale, stream=stream, check_indices=False)

        def ref():  # gather the pages, then one SDPA call (GQA by repeating kv heads)
            k = kc.view(-1, hkv, d)[slot].transpose(1, 2)  # [B, Hkv, L, D]
            v = vc.view(-1, hkv, d)[slot].transpose(1, 2)
            if hq != hkv:
                k = k.repeat_interleave(hq // hkv, dim=1)
                v = v.repeat_interleave(hq // hkv, dim=1)
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale
            )
            ref_out["o"] = o[:, :, 0, :]

        def same():
            tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
            return torch.allclose(out.float(), ref_out["o"].float(), atol=tol, rtol=tol)

        moved = int(lens.sum()) * hkv * d * es * 2 + 2 * b * hq * d * es
        return run, ref, same, moved

    raise AssertionError(op)


# ----------------------------------------------------------------------------- timing


def time_cuda(fn, calls, trials, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_cpu(fn, calls, trials, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def describe(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "blocks")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: f16 on CUDA, f32 on CPU")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth (GB/s) to compare with")
    ap.add_argument("--trials", type=int, default=None)
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if ponder.cuda_available() and torch.cuda.is_available() else "cpu"
    if device == "cuda" and not ponder.cuda_available():
        print("ponder has no usable CUDA kernels here: " + str(_core.cuda_status()), file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("f16" if device == "cuda" else "f32")]
    gen = torch.Generator().manual_seed(0)
    trials = args.trials or (5 if args.quick else 11)

    info = {
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "ponder": ponder.__version__,
        "build": {k: v for k, v in ponder.build_info().items() if k in ("cuda", "cuda_architectures", "openmp", "build_type")},
    }
    if device == "cuda":
        name, peak = device_peak_gbs(torch.device("cuda"))
        info["device_name"] = name
        info["peak_gbs"] = args.peak_gbs or peak
    else:
        info["threads"] = torch.get_num_threads()
        info["cpu_count"] = os.cpu_count()

    rows, ok = [], True
    for op, cfg in workloads(args.quick, device):
        run, ref, same, moved = setup(op, cfg, dtype, device, gen)
        if device == "cuda":
            with torch.cuda.device(0):
                t_ponder = time_cuda(run, calls=20, trials=trials)
                t_torch = time_cuda(ref, calls=5, trials=max(3, trials // 2))
                torch.cuda.synchronize()
        else:
            t_ponder = time_cpu(run, calls=3, trials=trials)
            t_torch = time_cpu(ref, calls=1, trials=max(3, trials // 2))
        run()
        ref()
        if device == "cuda":
            torch.cuda.synchronize()
        agree = bool(same())
        ok &= agree
        gbs = moved / (t_ponder * 1e-3) / 1e9
        row = {
            "op": op,
            "config": cfg,
            "ponder_ms": round(t_ponder, 5),
            "torch_ms": round(t_torch, 5),
            "speedup_vs_torch": round(t_torch / t_ponder, 2),
            "bytes": moved,
            "ponder_gbs": round(gbs, 1),
            "agree": agree,
        }
        if info.get("peak_gbs"):
            row["pct_of_peak"] = round(100 * gbs / info["peak_gbs"], 1)
        rows.append(row)
        del run, ref, same
        if device == "cuda":
            torch.cuda.empty_cache()

    report = {**info, "results": rows, "all_agree": ok}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        head = f"ponder kernels on {info.get('device_name', 'cpu')} ({info['dtype']})"
        if device == "cuda":
            head += f", peak {info['peak_gbs']} GB/s" if info.get("peak_gbs") else ", peak unknown"
        else:
            head += f", {info['threads']} torch threads"
        print(head)
        print(f"{'op':<12} {'config':<58} {'ponder ms':>10} {'torch ms':>10} {'x torch':>8} {'GB/s':>8} {'% peak':>7} ok")
        for r in rows:
            pct = f"{r['pct_of_peak']:.1f}" if "pct_of_peak" in r else "-"
            print(
                f"{r['op']:<12} {describe(r['config']):<58} {r['ponder_ms']:>10.4f} {r['torch_ms']:>10.4f} "
                f"{r['speedup_vs_torch']:>8.2f} {r['ponder_gbs']:>8.1f} {pct:>7} {'yes' if r['agree'] else 'NO'}"
            )
    if not ok:
        print("ponder and torch DISAGREE on at least one workload", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
