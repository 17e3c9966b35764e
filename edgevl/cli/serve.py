"""edgevl serve: an OpenAI-compatible HTTP server (and a web page) over the in-flight scheduler.

Locally on uvicorn, or with ``--ray`` as a Ray Serve application of N replicas spread over the
nodes of a Ray cluster. Needs ``pip install edgevl[serve]`` (and ``edgevl[ray]`` for ``--ray``).
"""

from __future__ import annotations

import argparse
import os
import sys

from edgevl.errors import BackendUnavailable, ConfigError

API_KEY_ENV = "EDGEVL_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", default=None,
                   help="bundle directory, served under its model name (e.g. edgevl-tiny)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=BUNDLE",
                   help="serve another bundle under NAME; repeat for several (the first model is the default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network: use --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 and /metrics (default: ${API_KEY_ENV} if set)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                   help="fail a request not finished after S seconds, queue wait included (default 120; 0: never)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    p.add_argument("--max-images", type=int, default=1, help="most images per request (default 1)")
    p.add_argument("--allow-local-images", default=None, metavar="DIR",
                   help="accept image_url paths of files inside DIR (default: only base64 data: URLs)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (the server then makes requests for its clients)")
    p.add_argument("--backend", default=None, help="onnxruntime, openvino or tensorrt (default: best installed)")
    p.add_argument("--threads", type=int, default=None, help="threads per model part (default: half the cores)")
    p.add_argument("--max-batch", type=int, default=8, help="KV slots: sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="image batching wait (default 5 ms)")
    p.add_argument("--engine", default="process", choices=["process", "thread"],
                   help="where each model runs: 'process' (default), an engine process per model, so decoding "
                        "never waits for the HTTP event loop's GIL; 'thread', in the server's own process")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, wait at most S seconds for in-flight requests (default 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = p.add_argument_group("Ray Serve (pip install edgevl[ray])")
    ray.add_argument("--ray", action="store_true", help="serve on a Ray cluster with Ray Serve")
    ray.add_argument("--ray-address", default=None,
                     help="cluster to join (default: $RAY_ADDRESS, else 'auto': the one `ray start` made here)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas of the model server (default 1)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="autoscale between MIN and MAX replicas instead of a fixed --replicas")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")


def parse_models(args) -> dict[str, str]:
    """Served name -> bundle path, the positional bundle first (named after its model)."""
    from edgevl.bundle import load_bundle

    models: dict[str, str] = {}
    if args.bundle:
        name = load_bundle(args.bundle).manifest.get("model", {}).get("name") or "default"
        models[name] = args.bundle
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model takes NAME=BUNDLE, got {spec!r}")
        if name in models:
            raise ConfigError(f"model name {name!r} is given twice; choose distinct names")
        models[name] = path
    if not models:
        raise ConfigError("give a bundle to serve: edgevl serve BUNDLE (or --model NAME=BUNDLE)")
    return models


def serve_config(args):
    from pathlib import Path

    from edgevl.serving.app import ServeConfig
    from edgevl.serving.images import ImagePolicy

    if args.allow_local_images and not Path(args.allow_local_images).is_dir():
        raise ConfigError(f"--allow-local-images {args.allow_local_images} is not a directory")
    max_bytes = int(args.max_body_mb * 2**20)
    return ServeConfig(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                       request_timeout_s=args.request_timeout or None, max_body_mb=args.max_body_mb,
                       max_images=args.max_images,
                       images=ImagePolicy(local_dir=Path(args.allow_local_images) if args.allow_local_images else None,
                                          allow_remote=args.allow_remote_images, max_bytes=max_bytes))


def load_models(paths: dict[str, str], args) -> dict:
    import edgevl

    settings = dict(backend=args.backend, threads=args.threads, max_batch_size=args.max_batch,
                    max_wait_ms=args.max_wait_ms, max_queue_size=args.max_queue)
    if getattr(args, "engine", "thread") == "process":
        from edgevl.serving.engine_process import RemoteVLM

        models = {}
        try:
            for name, path in paths.items():
                models[name] = RemoteVLM(path, name=name, **settings)
        except BaseException:
            for vlm in models.values():       # no engine process outlives a failed start
                vlm.close()
            raise
        return models
    return {name: edgevl.load(path, batching=True, **settings) for name, path in paths.items()}


def run(args) -> int:
    try:
        from edgevl.serving.app import create_app
        from edgevl.serving.server import serve
    except ImportError as e:
        raise BackendUnavailable(f"edgevl serve needs the serve extra ({e.name} is missing): "
                                 "pip install 'edgevl[serve]'") from None
    paths = parse_models(args)
    config = serve_config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"edgevl serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    if args.ray:
        from edgevl.serving.ray_serve import deploy

        return deploy(paths, args, config)
    app = create_app(load_models(paths, args), config)
    serve(app, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout, log_level=args.log_level)
    print("edgevl serve: drained and stopped", file=sys.stderr)
    return 0

