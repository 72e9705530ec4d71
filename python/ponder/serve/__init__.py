"""``ponder serve``: test-time search behind an OpenAI-compatible HTTP API (docs/serve.md).

``create_app(engine, settings)`` (``ponder.serve.app``) builds the FastAPI app over one
``ponder.AsyncEngine``; ``ponder.serve.cli.main`` is the command. Needs the ``serve`` extra
(FastAPI, uvicorn, prometheus_client); importing this package does not import them.
"""

from __future__ import annotations

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
