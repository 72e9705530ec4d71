"""Spread an evaluation over a Ray cluster: ``ponder run --ray [ADDRESS] --workers K``.

    from ponder.distributed import ModelLoader, run_evaluation_ray
    from ponder.evaluation import EvalConfig
    loader = ModelLoader(policy="builtin:policy-small", prm="builtin:prm")
    config = EvalConfig(methods=["greedy", "dvts"], ns=[4, 16], base_config=SearchConfig(beam_width=4))
    rows = run_evaluation_ray(problems, loader, config, out_dir=Path("runs/x"), resume=False,
                              workers=4, gpus_per_worker=1)

The unit of work is a *job*: one batch of problems of one search group, exactly the batches a
single-process :func:`ponder.evaluation.run_evaluation` makes (the pending problems of each
(method, n) group cut every ``batch_size``). A batch is searched by one ``ponder.search`` call
whose random stream is seeded by the config's seed and depends on the batch's problems, so
the same batches give the same rows as a single-process run with the same seed (``wall_s``
aside), whichever worker runs them and in whatever order. A resume searches again every batch
with a missing row, whole, so its rows too are those of a fresh run.

K Ray actors (``_Worker``) each load the models once (``loader()``, kept until a job brings
another loader, e.g. the reference policy's greedy pass) with ``torch.set_num_threads`` pinned
to their CPUs; each holds one job at a time, so every problem's tree lives on one worker. Rows
come back to the driver as each job finishes; the driver alone appends them to
``results.jsonl`` (flushed, fsynced; a key already there is never written again), so
``--resume`` works as for a single-process run. A worker process that dies is restarted by Ray
and its job retried (``max_restarts`` / ``max_task_retries``); a job whose worker is gone for
good goes to another worker; nothing is written for a job until it has finished.

``ray`` is an optional dependency (``pip install "ponder[ray]"``); :func:`require_ray` says
how to install it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .data import Problem
from .evaluation import EvalConfig, model_revision
from .evaluation import run as _run
from .evaluation.results import RESULTS_FILE, append_rows, check_manifest, result_row, row_key, run_manifest
from .methods import SearchConfig

INSTALL_HINT = 'pip install "ponder[ray]" (or: pip install "ray>=2.9")'


class RayMissing(ImportError):
    """``ray`` is not installed; the message says how to install it."""


def require_ray():
    """Import and return ``ray``; RayMissing (one line naming the install command) when absent."""
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# ----------------------------------------------------------------------------- models on a worker


@dataclasses.dataclass(frozen=True)
class ModelLoader:
    """What a worker loads, as a picklable recipe: ``loader()`` returns ``(policy, prm)``.

    ``policy``: a local directory, hub id or ``builtin:<name>`` loaded as ``HFPolicy``; with
    ``policy_url`` it is the model name the server serves and the policy is
    ``OpenAIPolicy(policy_url, policy, tokenizer=policy_tokenizer)``. ``prm``: None (greedy /
    majority only) or a PRM reference loaded as ``HFPRM`` with ``prm_format``,
    ``prm_reference`` and ``prm_beta``. ``device`` None: cuda when the worker's torch sees a
    GPU, else cpu. ``kv_budget``: each model's KV pool in tokens (None: the model's default).
    """

    policy: str
    prm: str | None = None
    device: str | None = None
    dtype: str | None = None
    kv_budget: int | None = None
    prm_format: str = "auto"
    prm_reference: str | None = None
    prm_beta: float | None = None
    policy_url: str | None = None
    policy_tokenizer: str | None = None

    @property
    def has_prm(self) -> bool:
        return self.prm is not None

    def __call__(self) -> tuple[Any, Any]:
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.policy_url:
            from .openai_policy import OpenAIPolicy

            policy = OpenAIPolicy(self.policy_url, self.policy, tokenizer=self.policy_tokenizer)
        else:
            from .hf.policy import HFPolicy

            policy = HFPolicy(self.policy, device=device, dtype=self.dtype, kv_budget=self.kv_budget)
        prm = None
        if self.prm is not None:
            from .hf.prm import HFPRM

            prm = HFPRM(self.prm, format=self.prm_format, device=device, dtype=self.dtype, kv_budget=self.kv_budget,
                        reference=self.prm_reference, beta=self.prm_beta)
        return policy, prm


def loaded_info(policy, prm) -> dict:
    """What the loaded models resolved, for the run record: the policy's loaded path and the
    PRM's format, beta and reference model path (None where a model does not say)."""
    info: dict[str, Any] = {"policy_path": getattr(getattr(policy, "model", None), "name_or_path", None) or None}
    if prm is not None:
        info["prm_format"] = getattr(prm, "format", None)
        info["prm_beta"] = getattr(prm, "beta", None)
        ref_model = getattr(prm, "ref_model", None)
        info["prm_reference_path"] = getattr(ref_model, "name_or_path", None) if ref_model is not None else None
    return info


@dataclasses.dataclass
class _Job:
    index: int
    group: list[tuple[str, int]]
    configs: dict[tuple[str, int], SearchConfig]
    batch: list[Problem]
    policy_label: str
    attempts: int = 0


def _job_rows(job: _Job, policy, prm) -> list[dict]:
    """Search one job's batch and build its rows, as ``run_evaluation`` does for a batch."""
    method, n = job.group[0]
    t0 = time.perf_counter()
    by_method = _run.search_batch(job.batch, policy, prm, job.configs[(method, n)], [m for m, _ in job.group])
    share = (time.perf_counter() - t0) / len(job.batch)
    rows = []
    for m, k in job.group:
        rows += [result_row(p, r, m, k, job.configs[(m, k)], share, job.policy_label, shared=len(job.group) > 1)
                 for p, r in zip(job.batch, by_method[m])]
    return rows


class _Worker:
    """A Ray actor: loads the models of a loader once and searches jobs with them."""

    def __init__(self, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self._key: str | None = None
        self._models: tuple[Any, Any] | None = None

    def models(self, key: str, loader: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        if self._key != key:
            self._models = None  # drop the previous models before loading the next ones
            gc.collect()
            self._models = loader()
            self._key = key
        return self._models

    def info(self, key: str, loader) -> dict:
        """Load the models (if not yet) and return :func:`loaded_info`."""
        return loaded_info(*self.models(key, loader))

    def run(self, key: str, loader, job: _Job) -> tuple[int, list[dict]]:
        policy, prm = self.models(key, loader)
        return job.index, _job_rows(job, policy, prm)

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()


# ----------------------------------------------------------------------------- the cluster


def plan_jobs(problems: list[Problem], config: EvalConfig, *, done: set, has_prm: bool,
              policy_label: str = "") -> list[_Job]:
    """The jobs of an evaluation: for each group of ``ponder.evaluation.run.search_groups`` (plan
    order), its problems cut every ``config.batch_size`` -- the batches a fresh
    ``run_evaluation`` searches --, each batch that has a row not in ``done``. A batch is
    searched whole even when some of its rows are done (a kill cut its rows short), so its rows
    are those of a fresh run (a single-process resume re-cuts the pending problems instead)."""
    configs = config.configs()
    jobs: list[_Job] = []
    for group in _run.search_groups(config.pairs(), _run.shares_samples(config, has_prm)):
        for start in range(0, len(problems), config.batch_size):
            batch = problems[start : start + config.batch_size]
            if any((str(p.id), policy_label, m, k) not in done for p in batch for m, k in group):
                jobs.append(_Job(len(jobs), group, {pair: configs[pair] for pair in group}, batch, policy_label))
    return jobs


def worker_cpus(ray, workers: int, cpus_per_worker: int | None) -> int:
    """CPUs (and torch threads) per worker: ``cpus_per_worker``, else the cluster's CPUs split
    over the workers (at least 1, at most the largest node's CPUs)."""
    if cpus_per_worker is not None:
        return max(1, int(cpus_per_worker))
    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max([int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [total])
    return max(1, min(total // max(1, workers), largest))


class Cluster:
    """K worker actors on the Ray cluster ``ray`` is connected to (``ray.init`` first).

    Each actor asks for ``cpus`` CPUs (its torch threads) and ``gpus`` GPUs; Ray restarts a
    dead one up to ``max_restarts`` times and retries its job up to ``max_restarts`` times.
    ``close()`` ends the actors."""

    def __init__(self, workers: int, *, cpus: int, gpus: float = 0, max_restarts: int = 3) -> None:
        ray = require_ray()
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        self.ray = ray
        self.cpus, self.gpus, self.max_restarts = cpus, gpus, max_restarts
        cls = ray.remote(_Worker)
        self.actors = [
            cls.options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts, max_task_retries=max_restarts).remote(cpus)
            for _ in range(workers)
        ]
        self.dead: set[int] = set()

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        self.actors = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, loader) -> dict:
        """Load the models on one worker and return what they resolved (:func:`loaded_info`)."""
        key, ref = _loader_ref(self.ray, loader)
        return self.ray.get(self.actors[0].info.remote(key, ref))

    def run_jobs(self, jobs: list[_Job], loader, on_rows: Callable[[_Job, list[dict]], None]) -> None:
        """Run every job, one at a time per worker, calling ``on_rows(job, rows)`` in the
        driver as each finishes (in completion order). An error raised by a search is raised
        here (the original exception); a worker gone for good hands its job to another worker,
        at most ``max_restarts + 1`` times per job, then RuntimeError."""
        ray = self.ray
        key, ref = _loader_ref(ray, loader)
        queue = deque(jobs)
        running: dict[Any, tuple[int, _Job]] = {}  # future -> (actor index, job)
        idle = [i for i in range(len(self.actors)) if i not in self.dead]

        def dispatch():
            while queue and idle:
                i = idle.pop(0)
                job = queue.popleft()
                running[self.actors[i].run.remote(key, ref, job)] = (i, job)

        dispatch()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            fut = ready[0]
            i, job = running.pop(fut)
            try:
                _, rows = ray.get(fut)
            except ray.exceptions.RayActorError as exc:
                self.dead.add(i)
                job.attempts += 1
                if job.attempts > self.max_restarts or len(self.dead) == len(self.actors):
                    raise RuntimeError(
                        f"Ray worker died running {len(job.batch)} problems of {job.group[0][0]} n={job.group[0][1]} "
                        f"({job.attempts} times; {len(self.dead)} of {len(self.actors)} workers gone): "
                        f"{' '.join(str(exc).split())[:300]}; rerun with --resume"
                    ) from None
                queue.appendleft(job)
                dispatch()
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise
            idle.append(i)
            on_rows(job, rows)
            dispatch()


def _loader_ref(ray, loader) -> tuple[str, Any]:
    from ray import cloudpickle

    blob = cloudpickle.dumps(loader)
    return hashlib.sha256(blob).hexdigest(), ray.put(loader)


def run_evaluation_ray(
    problems: list[Problem],
    loader: Callable[[], tuple[Any, Any]],
    config: EvalConfig,
    *,
    out_dir: Path,
    resume: bool,
    progress: bool = True,
    policy_label: str = "",
    manifest: dict | None = None,
    cluster: Cluster | None = None,
    workers: int = 2,
    cpus_per_worker: int | None = None,
    gpus_per_worker: float = 0,
    has_prm: bool | None = None,
) -> list[dict]:
    """``ponder.evaluation.run_evaluation`` with the batches searched on Ray workers.

    ``loader``: a picklable callable returning ``(policy, prm)`` on a worker (see
    :class:`ModelLoader`); ``has_prm`` (default ``loader.has_prm``, else True) says whether it
    gives a PRM, which decides whether majority / best-of-N share their samples, as in
    ``run_evaluation``. ``cluster``: the workers to use (kept open); None: ``workers`` new
    ones with ``cpus_per_worker`` (default :func:`worker_cpus`) and ``gpus_per_worker``,
    closed at the end. Ray must be initialised (``ray.init``) when ``cluster`` is None.

    ``config`` and every other argument, the checks before any search
    (``ponder.evaluation.run.prepare``: ``config.validate``, out_dir, run.json against a resumed
    run), the rows, ``results.jsonl`` (appended by this process only, one fsync per finished
    job, a row key never written twice) and the return value are ``run_evaluation``'s; the
    rows equal a single-process run's with the same arguments (``wall_s`` aside: each job's
    wall time on its worker divided by its problems). Rows are appended in completion order.
    """
    out_dir = Path(out_dir)
    if has_prm is None:
        has_prm = bool(getattr(loader, "has_prm", True))
    done = _run.prepare(problems, config, out_dir=out_dir, resume=resume, has_prm=has_prm, manifest=manifest)
    results_path = out_dir / RESULTS_FILE
    pairs = config.pairs()

    jobs = plan_jobs(problems, config, done=set(done), has_prm=has_prm, policy_label=policy_label)
    total = len(problems) * len(_run.search_groups(pairs, _run.shares_samples(config, has_prm)))
    remaining = sum(len(j.batch) for j in jobs)  # partly done batches count whole
    desc = f"ray: {'+'.join(dict.fromkeys(m for m, _ in pairs))}" + (f" [{policy_label}]" if policy_label else "")
    bar = _run.progress_bar(total, total - remaining, desc, progress)

    def on_rows(job: _Job, rows: list[dict]) -> None:
        new = [r for r in rows if row_key(r) not in done]
        append_rows(results_path, new)
        for row in new:
            done[row_key(row)] = row
        bar.update(len(job.batch))

    own = cluster is None
    try:
        if jobs:
            if own:
                ray = require_ray()
                cpus = worker_cpus(ray, workers, cpus_per_worker)
                cluster = Cluster(min(workers, len(jobs)), cpus=cpus, gpus=gpus_per_worker)
            cluster.run_jobs(jobs, loader, on_rows)
    finally:
        bar.close()
        if own and cluster is not None:
            cluster.close()
    return [done[(str(p.id), policy_label, m, n)] for m, n in pairs for p in problems]


# ----------------------------------------------------------------------------- ponder run --ray


def check_cli_args(args) -> str | None:
    """``ponder run --ray``'s options before any work: Ray installed, --workers >= 1,
    --gpus-per-worker >= 0, --cpus-per-worker >= 1; an error line or None. With GPUs per
    worker and no --dtype, sets ``args.dtype`` to bfloat16 (the default on cuda)."""
    try:
        require_ray()
    except RayMissing as exc:
        return str(exc)
    if args.workers < 1:
        return f"--workers must be >= 1; got {args.workers}"
    if args.gpus_per_worker < 0:
        return f"--gpus-per-worker must be >= 0; got {args.gpus_per_worker}"
    if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
        return f"--cpus-per-worker must be >= 1; got {args.cpus_per_worker}"
    if args.gpus_per_worker > 0 and args.dtype is None:
        args.dtype = "bfloat16"  # the workers' models run on cuda, whatever the driver sees
    return None


def evaluate_cli(args, problems: list[Problem], config: EvalConfig, sections: dict, out_dir: Path) -> list[dict]:
    """The work of ``ponder run --ray`` once every option, the dataset, ``config`` (validated)
    and run.json (``sections``: its dataset, models and execution) are checked
    (``ponder.cli._execute``): connect to Ray, start the workers, load the models on them
    (the run record is completed with what they resolved and checked again), run the
    evaluation and the reference policy's greedy pass on the same workers; returns the rows.
    Mistakes and load failures raise ``ponder.cli._Refused`` (one line)."""
    from .cli import _kv_budget, _model_record, _Refused
    from .evaluation import GREEDY
    from .hf.kv import KVCacheFull

    models, labels = sections["models"], args.labels
    device = "cuda" if args.gpus_per_worker > 0 else args.device
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    models["dtype"] = dtype
    n_max, base, needs_prm = max(config.ns), config.base_config, config.needs_prm
    loader = ModelLoader(
        policy=args.policy, prm=args.prm if needs_prm else None, device=device, dtype=dtype,
        kv_budget=_kv_budget(args, problems, n_max, base), prm_format=args.prm_format,
        prm_reference=args.prm_reference if needs_prm else None, prm_beta=args.prm_beta,
        policy_url=args.policy_url, policy_tokenizer=args.policy_tokenizer)
    try:
        disconnect = connect(args.ray)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError: one line for the user
        raise _Refused(f"--ray {args.ray or '(RAY_ADDRESS / local)'}: could not connect: {' '.join(str(exc).split())[:300]}") from None
    try:
        ray = require_ray()
        cpus = worker_cpus(ray, args.workers, args.cpus_per_worker)
        have = ray.cluster_resources()
        for what, each, unit in (("--cpus-per-worker", cpus, "CPU"), ("--gpus-per-worker", args.gpus_per_worker, "GPU")):
            if each * args.workers > have.get(unit, 0):
                raise _Refused(f"--workers {args.workers} x {what} {each:g} needs {each * args.workers:g} {unit}s; the Ray "
                               f"cluster has {have.get(unit, 0):g}: lower --workers or {what}, or add nodes")
        sections["execution"].update(ray=args.ray or "local", workers=args.workers, cpus_per_worker=cpus,
                                     gpus_per_worker=args.gpus_per_worker)
        with Cluster(args.workers, cpus=cpus, gpus=args.gpus_per_worker) as cluster:
            try:
                info = cluster.info(loader)
            except (OSError, ValueError, ImportError) as exc:
                raise _Refused(f"--policy {labels['policy']} / --prm on a Ray worker: could not load the models: "
                               f"{' '.join(str(exc).split())[:400]}") from None
            if needs_prm:
                if info.get("prm_format") is not None:
                    models["prm"]["format"] = info["prm_format"]
                    models["prm"]["beta"] = info.get("prm_beta")
                if info.get("prm_reference_path") is not None:
                    models["prm_reference"] = _model_record(labels.get("prm_reference", "(the PRM's config)"),
                                                            info["prm_reference_path"])
            revision = model_revision(info.get("policy_path") or args.policy)
            if revision is not None:
                models["policy"]["revision"] = revision
            manifest = check_manifest(out_dir, run_manifest(problems, base, **sections), True)
            print(f"ponder run: {len(problems)} problems, methods {','.join(config.methods)}, "
                  f"n {','.join(map(str, config.ns))} "
                  f"on {args.workers} Ray workers ({cpus} CPUs, {args.gpus_per_worker:g} GPUs each) -> {out_dir}",
                  file=sys.stderr)
            common = dict(out_dir=out_dir, progress=not args.no_progress, cluster=cluster)
            rows = run_evaluation_ray(problems, loader, config, resume=args.resume,
                                      policy_label=labels["policy"], manifest=manifest, **common)
            if args.reference_policy is not None:
                reference = ModelLoader(policy=args.reference_policy, device=device, dtype=dtype,
                                        kv_budget=_kv_budget(args, problems, 1, base))
                revision = model_revision(args.reference_policy)
                if revision is not None and "revision" not in models["reference_policy"]:
                    models["reference_policy"]["revision"] = revision
                manifest = check_manifest(out_dir, run_manifest(problems, base, **sections), True)
                greedy = dataclasses.replace(config, methods=[GREEDY], ns=[1])
                rows += run_evaluation_ray(problems, reference, greedy, resume=True,
                                           policy_label=labels["reference_policy"], manifest=manifest, **common)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raise _Refused(exc) from None
    except KVCacheFull as exc:
        raise _Refused(f"KVCacheFull: {exc}") from None
    finally:
        disconnect()
    return rows


def connect(address: str | None):
    """Connect this process to Ray (``ray.init``): ``address`` a cluster's address (``auto``:
    the one running on this machine, ``ray://host:10001``: Ray Client), None: ``RAY_ADDRESS``
    or else a new local cluster. Already connected: nothing. Returns a function that
    disconnects again what this call connected."""
    ray = require_ray()
    if ray.is_initialized():
        return lambda: None
    import os

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, logging_level="ERROR", log_to_driver=False)
    else:  # a new local cluster, without the dashboard
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    return ray.shutdown


__all__ = ["Cluster", "ModelLoader", "RayMissing", "check_cli_args", "connect", "evaluate_cli", "loaded_info", "plan_jobs",
           "require_ray", "run_evaluation_ray", "worker_cpus"]
