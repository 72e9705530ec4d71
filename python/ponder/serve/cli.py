"""``ponder serve``: the OpenAI-compatible server on one engine (see docs/serve.md).

    ponder serve [--policy builtin:policy-small] [--prm builtin:prm] [--host 127.0.0.1]
                 [--port 8000] [--api-key KEY] [--max-queue 64] [--device cpu|cuda] ...

``main(argv)`` returns the exit status: 0 after a clean shutdown (SIGTERM / Ctrl-C: in-flight
requests get ``--grace`` seconds, then their searches are cancelled and they answer with what
they have), 2 for a mistake in the command line or a missing ``serve`` extra (one line on
stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_POLICY = "builtin:policy-small"
DEFAULT_PRM = "builtin:prm"
# The built-in policy's task (builtin:arith) needs few short steps; these keep every path
# inside its 1024-token context (16 x 56 + the prompt).
BUILTIN_DEFAULTS = {"num_iterations": 16, "max_steps": 16, "sampling": {"max_step_tokens": 56}}
INSTALL_HINT = 'ponder serve: error: needs the serve extra (FastAPI, uvicorn, prometheus_client): pip install "ponder[serve]"'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ponder serve",
        description="Serve test-time search behind an OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics). Every option has a default: the built-in models, "
        "offline, on 127.0.0.1:8000.",
    )
    p.add_argument("--policy", default=DEFAULT_POLICY, help="policy model: builtin:<name>, a local directory or a hub id "
                   "(default %(default)s)")
    p.add_argument("--prm", default=DEFAULT_PRM, help="PRM: builtin:prm, a directory, a hub id, or 'none' (then only "
                   "plain sampling and majority voting; default %(default)s)")
    p.add_argument("--prm-format", default="auto", help="PRM format (default auto-detected)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("PONDER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PONDER_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the policy's name, e.g. policy-small)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests in flight at once; one more gets 429 with Retry-After (default %(default)s)")
    p.add_argument("--max-live", type=int, default=None,
                   help="searches the engine runs at once (default: as many as KV memory admits)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when torch sees a GPU)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, else bfloat16)")
    p.add_argument("--kv-budget", type=int, default=32768, help="KV pool size in tokens, per model (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a search may run; it then answers with what it has (default %(default)s)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests get before their searches are cancelled (default %(default)s)")
    p.add_argument("--strategy", default=None, help="strategy table for method='auto' and reasoning_effort "
                   "(default: the built-in one, when shipped)")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--max-prompt-chars", type=int, default=8192, help="default %(default)s")
    lim.add_argument("--max-choices", type=int, default=8, help="largest request n (choices) (default %(default)s)")
    lim.add_argument("--max-search-n", type=int, default=64, help="largest search n / beam_width / budget (default %(default)s)")
    lim.add_argument("--max-iterations", type=int, default=64, help="largest search num_iterations (default %(default)s)")
    lim.add_argument("--max-steps", type=int, default=64, help="largest search max_steps (default %(default)s)")
    lim.add_argument("--max-step-tokens", type=int, default=512, help="largest sampling.max_step_tokens (default %(default)s)")
    lim.add_argument("--max-lookahead", type=int, default=8, help="largest search lookahead (default %(default)s)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default %(default)s)")
    return p


def _fail(message: str) -> int:
    print(f"ponder serve: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _have_extra() -> bool:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def _check_device(device: str | None) -> tuple[str | None, str | None]:
    import torch

    if device is None:
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        return None, f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps"
    if d.type == "cuda" and not torch.cuda.is_available():
        return None, f"--device {device}: torch sees no CUDA GPU; use --device cpu"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return None, f"--device {device}: MPS is not available; use --device cpu"
    if d.type not in ("cpu", "cuda", "mps"):
        return None, f"--device {device}: ponder runs models on cpu, cuda or mps"
    return device, None


def served_name(policy: str) -> str:
    """The default model id: ``builtin:policy-small`` -> ``policy-small``, a directory -> its
    name, a hub id as written."""
    if policy.startswith("builtin:"):
        return policy.split(":", 1)[1]
    if os.path.isdir(os.path.expanduser(policy)):
        return os.path.basename(os.path.normpath(os.path.expanduser(policy)))
    return policy


def _validate(args) -> str | None:
    for flag in ("port", "max_queue", "max_prompt_chars", "max_choices", "max_search_n", "max_iterations", "max_steps",
                 "max_step_tokens", "kv_budget"):
        v = getattr(args, flag)
        if v < (0 if flag == "port" else 1) or (flag == "port" and v > 65535):
            return f"--{flag.replace('_', '-')} {v} is out of range"
    if args.max_lookahead < 0:
        return f"--max-lookahead {args.max_lookahead} must be >= 0"
    if args.max_live is not None and args.max_live < 1:
        return f"--max-live {args.max_live} must be >= 1"
    if not args.request_timeout > 0 or args.grace < 0:
        return "--request-timeout must be > 0 and --grace >= 0"
    if args.api_key is not None and not args.api_key.strip():
        return "--api-key is empty"
    return None


def make_server(args):
    """Load the models and build (uvicorn config, app, engine) from parsed arguments."""

    from ..engine import AsyncEngine
    from ..hf.policy import HFPolicy
    from ..hf.prm import HFPRM
    from .app import ServeSettings, auto_available, create_app
    from .protocol import Limits

    policy = HFPolicy(args.policy, device=args.device, dtype=args.dtype, kv_budget=args.kv_budget)
    prm = None
    if args.prm.lower() != "none":
        prm = HFPRM(args.prm, format=args.prm_format, device=args.device, dtype=args.dtype, kv_budget=args.kv_budget)
    engine = AsyncEngine(policy, prm, max_live=args.max_live)
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_choices=args.max_choices, max_search_n=args.max_search_n,
                    max_iterations=args.max_iterations, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                    max_lookahead=args.max_lookahead)
    defaults: dict = {}
    if args.policy == DEFAULT_POLICY:  # the task's step limits, within this server's limits
        steps = min(BUILTIN_DEFAULTS["max_steps"], args.max_steps)
        defaults = {"max_steps": steps, "num_iterations": min(BUILTIN_DEFAULTS["num_iterations"], args.max_iterations, steps),
                    "sampling": {"max_step_tokens": min(BUILTIN_DEFAULTS["sampling"]["max_step_tokens"],
                                                        args.max_step_tokens)}}
    if args.strategy is not None:
        defaults["strategy"] = args.strategy
    settings = ServeSettings(
        model_name=args.served_model_name or served_name(args.policy), api_key=args.api_key, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, limits=limits, defaults=defaults,
        auto_available=auto_available(args.strategy),
    )
    app = create_app(engine, settings)
    return server_config(app, args.host, args.port, args.grace, args.log_level), app, engine


def server_config(app, host: str, port: int, grace: float, log_level: str = "warning"):
    """uvicorn's config for ``app``: graceful shutdown after ``grace`` seconds, lifespan on."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                          lifespan="on")


def run_server(app, config, grace: float, banner: str | None = None) -> bool:
    """Serve ``app`` (from ``create_app``) until SIGTERM / SIGINT; returns whether it started.

    On the signal uvicorn stops accepting connections and waits up to ``grace`` seconds for
    in-flight requests; the app's drain cancels the searches still running after ``grace - 1``
    seconds so that their requests answer (``ponder.stopped = "cancelled"``) before uvicorn's
    deadline; then the lifespan closes the engine."""
    import asyncio
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            loop = getattr(self, "loop", None)
            if loop is not None and not self.should_exit:
                loop.call_soon_threadsafe(app.state.drain, grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a captured SIGTERM / SIGINT after its graceful shutdown (the
            # process then dies of the signal); a shutdown that completed exits normally here.
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", None)
                    if isinstance(captured, list):
                        captured.clear()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and banner:
                print(banner, file=sys.stderr, flush=True)

    server = Server(config)
    server.run()
    return bool(server.started)


def main(argv: list[str] | None = None) -> int:
    """``ponder serve``; see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not _have_extra():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    problem = _validate(args)
    if problem is None:
        args.device, problem = _check_device(args.device)
    if problem is None and args.strategy is not None and not os.path.isfile(args.strategy):
        problem = f"--strategy {args.strategy}: no such file"
    if problem is not None:
        return _fail(problem)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        config, app, _engine = make_server(args)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(f"could not load the models: {exc}"[:500])

    started = run_server(app, config, args.grace, f"ponder serve: serving {app.state.settings.model_name} on "
                         f"http://{args.host}:{args.port}/v1 (policy {args.policy}, prm {args.prm}, device {args.device})")
    return 0 if started else 1
