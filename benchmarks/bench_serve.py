"""Load test of ``ponder serve`` on loopback: 1, 8 and 32 concurrent clients.

    python benchmarks/bench_serve.py [--quick] [--json] [--levels 1,8,32] [--port P]

Starts ``python -m ponder serve`` (the built-in models, CPU unless --device) on a free loopback
port, then for each concurrency level runs that many clients, each sending requests back to
back until the level's request count or time bound is reached; requests alternate between
PRM beam search (n=4, beam width 4) and best-of-N (n=4) on ``builtin:arith`` problems
(levels 1-3, round robin). Levels run in the order 1, 8, 32, 32, 8, 1 with half their budget
each time (a machine shared with other jobs drifts; this order cancels a steady drift), and
are pooled. Reported per level: requests/s, requests per CPU second of the server process
(all its threads: ``requests_per_server_cpu_s``, which other jobs on a shared machine do not
change), p50/p99 latency, errors (any non-200 or transport error), engine mean policy batch; overall: the server's RSS when idle
before the run, after it, and its peak (VmHWM), and the KV blocks still in use once idle
after the run (``kv_blocks_leaked``; must be 0). Targets (issue 16): 0 errors; throughput at
32 clients >= 4x one client's; KV blocks and RSS back to idle values.

JSON keys: ``throughput_32_over_1`` (wall clock), ``throughput_32_over_1_server_cpu``,
``load_average`` (at the end), ``errors``, ``kv_blocks_leaked``, ``p99_latency_s`` (the
worst level's p99), ``levels`` (per level numbers), ``rss_mb`` (idle, after, peak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

SEARCHES = [
    {"method": "beam_search", "n": 4, "beam_width": 4},
    {"method": "best_of_n", "n": 4},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss": out.get("VmRSS", float("nan")), "peak": out.get("VmHWM", float("nan"))}


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) the process has used so far; NaN without one."""
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _problems(k: int) -> list[str]:
    from ponder.toy.arith import load_arith

    probs = [p for p in load_arith(split="test") if p.level <= 3]
    return [p.problem for p in probs[:k]]


def start_server(port: int, device: str | None, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ponder", "serve", "--port", str(port), "--max-queue", "256", "--grace", "5"]
    if device:
        cmd += ["--device", device]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited: {open(log_path).read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("bench_serve: the server did not start in 300 s")
        time.sleep(0.3)


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def _wait_idle(url: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        h = _health(url)
        if (h["live"] == 0 and h["queued"] == 0 and h["in_flight"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.2)


async def run_level(url: str, clients: int, max_requests: int, max_s: float, problems: list[str]) -> dict:
    """``clients`` concurrent loops sending requests until ``max_requests`` were started or
    ``max_s`` seconds passed; every started request is awaited."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = {"started": 0}
    t0 = time.perf_counter()
    deadline = t0 + max_s
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(cid: int) -> None:
            while counter["started"] < max_requests and time.perf_counter() < deadline:
                i = counter["started"]
                counter["started"] += 1
                body = {"model": "policy-small", "seed": i,
                        "messages": [{"role": "user", "content": problems[i % len(problems)]}],
                        "search": SEARCHES[i % len(SEARCHES)]}
                s = time.perf_counter()
                try:
                    r = await http.post(url + "/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - s)

        await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"clients": clients, "requests": len(lat), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "requests_per_s": len(lat) / wall if wall > 0 else 0.0,
            "p50_latency_s": q(0.50), "p99_latency_s": q(0.99), "latencies": latencies}


def _combine(runs: list[dict]) -> dict:
    """One level's numbers from its runs: summed requests, errors and wall time (so req/s is
    the pooled rate); latency percentiles over all its requests."""
    lat = sorted(x for r in runs for x in r["latencies"])

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    wall = sum(r["wall_s"] for r in runs)
    cpu = sum(r["server_cpu_s"] for r in runs)
    calls = sum(r["policy_calls"] for r in runs)
    return {"clients": runs[0]["clients"], "requests": len(lat), "errors": sum(r["errors"] for r in runs),
            "error_samples": [e for r in runs for e in r["error_samples"]][:3], "wall_s": wall,
            "requests_per_s": len(lat) / wall if wall > 0 else 0.0, "p50_latency_s": q(0.50), "p99_latency_s": q(0.99),
            "server_cpu_s": cpu, "requests_per_server_cpu_s": len(lat) / cpu if cpu > 0 else float("nan"),
            "mean_policy_batch": sum(r["policy_rows"] for r in runs) / calls if calls else 0.0,
            "preemptions": sum(r["preemptions"] for r in runs),
            "requests_per_s_by_run": [r["requests_per_s"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_serve.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few requests per level (under ~60 s with startup)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--levels", default="1,8,32", help="concurrency levels (default %(default)s)")
    ap.add_argument("--device", default=None, help="the server's --device (default: its default)")
    ap.add_argument("--url", default=None, help="a running server instead of starting one (RSS then not reported)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    # requests and seconds per level: at least 2 rounds of the level's clients
    budget = {c: (max(4, 2 * c), 12.0) if args.quick else (max(24, 4 * c), 120.0) for c in levels}
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        log = os.path.join(tempfile.mkdtemp(prefix="bench-serve-"), "serve.log")
        proc = start_server(port, args.device, log)
        url = f"http://127.0.0.1:{port}"
    try:
        problems = _problems(64)
        # warm up: both methods once
        asyncio.run(run_level(url, 1, 2, 120.0, problems))
        idle = _wait_idle(url)
        kv_idle = idle.get("policy_kv_blocks_in_use", 0) + idle.get("prm_kv_blocks_in_use", 0)
        rss_idle = _rss_mb(proc.pid)["rss"] if proc else float("nan")
        # Each level runs twice, in the order 1, 8, 32, 32, 8, 1 (half its budget each time),
        # so that a machine getting busier or quieter during the run biases no level.
        parts: dict[int, list[dict]] = {c: [] for c in levels}
        for c in levels + levels[::-1]:
            before = _health(url)
            cpu0 = _cpu_s(proc.pid if proc else None)
            n, secs = budget[c]
            res = asyncio.run(run_level(url, c, max(c, n // 2), secs / 2, problems))
            res["server_cpu_s"] = _cpu_s(proc.pid if proc else None) - cpu0
            after = _wait_idle(url)
            res["policy_calls"] = after["policy_calls"] - before["policy_calls"]
            res["policy_rows"] = after["policy_rows"] - before["policy_rows"]
            res["preemptions"] = after["preemptions"] - before["preemptions"]
            parts[c].append(res)
        results = [_combine(parts[c]) for c in levels]
        end = _wait_idle(url)
        kv_end = end.get("policy_kv_blocks_in_use", 0) + end.get("prm_kv_blocks_in_use", 0)
        mem = _rss_mb(proc.pid) if proc else {"rss": float("nan"), "peak": float("nan")}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    by = {r["clients"]: r for r in results}
    ratio = (by[32]["requests_per_s"] / by[1]["requests_per_s"]) if 1 in by and 32 in by and by[1]["requests_per_s"] else None
    cpu_ratio = (by[32]["requests_per_server_cpu_s"] / by[1]["requests_per_server_cpu_s"]) if 1 in by and 32 in by else None
    out = {
        "levels": results,
        "throughput_32_over_1": ratio,
        # the same ratio per CPU second the server spent (all its threads): robust to other jobs
        # on a shared machine, which stretch wall time but not the server's own work
        "throughput_32_over_1_server_cpu": cpu_ratio,
        "load_average": os.getloadavg(),
        "errors": sum(r["errors"] for r in results),
        "kv_blocks_leaked": kv_end - kv_idle,
        "p99_latency_s": max(r["p99_latency_s"] for r in results),
        "rss_mb": {"idle": rss_idle, "after": mem["rss"], "peak": mem["peak"]},
        "quick": args.quick,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'clients':>7} {'reqs':>5} {'req/s':>7} {'req/cpu-s':>9} {'p50 s':>7} {'p99 s':>7} {'errors':>6} {'batch':>6}")
        for r in results:
            print(f"{r['clients']:>7} {r['requests']:>5} {r['requests_per_s']:>7.2f} {r['requests_per_server_cpu_s']:>9.2f} "
                  f"{r['p50_latency_s']:>7.2f} {r['p99_latency_s']:>7.2f} {r['errors']:>6} {r['mean_policy_batch']:>6.1f}")
        print(f"throughput 32/1: {ratio if ratio is None else round(ratio, 2)} (per server CPU second: "
              f"{cpu_ratio if cpu_ratio is None else round(cpu_ratio, 2)}; load average {out['load_average'][0]:.1f})  "
              f"errors: {out['errors']}  "
              f"KV blocks leaked: {out['kv_blocks_leaked']}  RSS MB idle/after/peak: "
              f"{rss_idle:.0f}/{mem['rss']:.0f}/{mem['peak']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
