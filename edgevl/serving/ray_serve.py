"""The same OpenAI server scaled out on Ray Serve (``pip install edgevl[ray]``; never on a device).

    from edgevl.serving.ray_serve import build_app
    serve.run(build_app({"edgevl-tiny": "/models/tiny"}, num_replicas=2), name="edgevl")

or ``edgevl serve BUNDLE --ray --replicas 2`` against a cluster made with ``ray start``. Each
replica (``EdgeVLServer``) loads the bundles with batching on and serves the app of
``edgevl.serving.app.create_app`` through Ray Serve's ingress, so routes, errors and metrics are
the ones of ``edgevl serve``. Each replica reserves ``num_cpus`` CPUs (1 by default), which is
what spreads replicas over the nodes; every answer carries ``X-EdgeVL-Replica: node/pid`` so a
client can see which replica answered. The bundle must be at the same path on every node.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from ray import serve

from edgevl.serving.app import ServeConfig, create_app

APP_NAME = "edgevl"


@serve.ingress()
class EdgeVLServer:
    """One replica: its own engines and scheduler, behind Ray Serve's HTTP proxy."""

    def __init__(self, paths: dict[str, str], config: ServeConfig, load_options: dict):
        import ray

        import edgevl

        self.models = {name: edgevl.load(path, batching=True, verbose=False, **load_options)
                       for name, path in paths.items()}
        self.config = config
        self.replica = f"{ray.get_runtime_context().get_node_id()[:12]}/{os.getpid()}"

    def __serve_build_asgi_app__(self):
        return _Tagged(create_app(self.models, self.config), self.replica)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose scheduler thread died."""
        dead = [n for n, vlm in self.models.items() if not vlm.scheduler.alive]
        if dead:
            raise RuntimeError(f"scheduler of {', '.join(dead)} is not running")


class _Tagged:
    """ASGI wrapper adding ``X-EdgeVL-Replica`` to every response."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-edgevl-replica", replica.encode())
        self.state = app.state

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def build_app(paths: dict[str, str], config: ServeConfig | None = None, num_replicas: int = 1,
              autoscale: tuple[int, int] | None = None, num_cpus: float = 1.0, max_ongoing_requests: int = 16,
              load_options: dict | None = None):
    """A Ray Serve application of ``EdgeVLServer`` replicas, ready for ``serve.run``."""
    options = dict(name="EdgeVLServer", ray_actor_options={"num_cpus": num_cpus},
                   max_ongoing_requests=max_ongoing_requests, health_check_period_s=2, health_check_timeout_s=10,
                   graceful_shutdown_timeout_s=30)
    if autoscale is not None:
        lo, hi = autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                                         "target_ongoing_requests": max(1, max_ongoing_requests // 2)}
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(EdgeVLServer, **options)
    return deployment.bind(paths, config or ServeConfig(), load_options or {})


def deploy(paths: dict[str, str], args, config: ServeConfig) -> int:
    """``edgevl serve --ray``: deploy on the cluster, serve until SIGTERM/Ctrl-C, then delete the app."""
    import ray

    from edgevl.errors import ConfigError

    autoscale = None
    if args.autoscale:
        lo, sep, hi = args.autoscale.partition(":")
        if not sep or not lo.isdigit() or not hi.isdigit() or not 0 <= int(lo) <= int(hi) or int(hi) < 1:
            raise ConfigError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {args.autoscale!r}")
        autoscale = (int(lo), int(hi))
    paths = {name: os.path.abspath(p) for name, p in paths.items()}
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port, "location": "HeadOnly"})
    load_options = {"backend": args.backend, "threads": args.threads, "max_batch_size": args.max_batch,
                    "max_wait_ms": args.max_wait_ms, "max_queue_size": args.max_queue}
    app = build_app(paths, config, num_replicas=args.replicas, autoscale=autoscale, num_cpus=args.replica_cpus,
                    max_ongoing_requests=args.max_batch + args.max_queue, load_options=load_options)
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"edgevl serve: listening on http://{args.host}:{args.port} (Ray Serve, "
          f"{'autoscaling ' + args.autoscale if autoscale else str(args.replicas) + ' replica(s)'})",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)        # replicas finish in-flight requests (graceful_shutdown_timeout_s)
    print("edgevl serve: Ray Serve application deleted", file=sys.stderr)
    return 0
