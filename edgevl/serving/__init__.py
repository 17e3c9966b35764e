"""Serving: an OpenAI-compatible HTTP server over the in-flight scheduler, plus offline batch.

    edgevl serve BUNDLE                      # FastAPI app on uvicorn, 127.0.0.1:8000
    app = edgevl.serving.create_app({"edgevl-tiny": edgevl.load(bundle, batching=True)})

Layout (one job per module): ``openai_schema`` (request parsing and validation, response and
chunk shapes), ``images`` (image_url parts to pixels, with the local/remote switches),
``generation`` (the bridge from the scheduler thread to asyncio, stop strings),
``metrics`` (Prometheus), ``app`` (routes, errors, auth, body limit), ``server`` (uvicorn,
SIGTERM drain), ``ray_serve`` (the same app as a Ray Serve deployment; needs ``edgevl[ray]``)
and ``batch`` (offline answers to a folder, video or glob, locally or on Ray Data).

Needs the ``serve`` extra (``pip install edgevl[serve]``); the device runtime never imports it.
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See edgevl.serving.app.create_app (imported lazily: FastAPI is an optional extra)."""
    from edgevl.serving.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
