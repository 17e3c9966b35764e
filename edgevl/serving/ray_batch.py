"""``edgevl batch --ray``: the same answers as a local run, from a Ray Data actor pool of engines.

Each actor loads the bundle once with batching on (``edgevl.load(..., batching=True)``) and
answers the blocks Ray Data hands it with the same code as the local run
(``edgevl.serving.batch.answer_local``), so greedy answers are identical. Needs ``edgevl[ray]``;
the bundle and the inputs must be readable at the same path on every node.
"""

from __future__ import annotations

from typing import Iterator

from edgevl.errors import BackendUnavailable
from edgevl.serving.batch import Item, answer_local

FIELDS = ("id", "source", "frame", "prompt", "answer", "tokens")


class Answerer:
    """A Ray Data actor: one engine, answering numpy batches of (source, frame)."""

    def __init__(self, bundle: str, prompt: str, sampling: dict, backend: str | None = None,
                 threads: int | None = None):
        import edgevl

        self.vlm = edgevl.load(bundle, backend=backend, threads=threads, batching=True, verbose=False)
        self.prompt, self.sampling = prompt, sampling

    def __call__(self, batch: dict) -> dict:
        items = [Item(str(s), None if int(f) < 0 else int(f)) for s, f in zip(batch["source"], batch["frame"])]
        records = list(answer_local(self.vlm, items, self.prompt, self.sampling))
        out = {k: [r[k] for r in records] for k in FIELDS}
        out["frame"] = [-1 if f is None else f for f in out["frame"]]
        return out


def answer_on_ray(items: list[Item], bundle: str, prompt: str, sampling: dict, actors: int = 2,
                  batch_size: int = 16, address: str | None = None, cpus_per_actor: float = 1.0,
                  backend: str | None = None, threads: int | None = None) -> Iterator[dict]:
    """Records as Ray Data finishes them (not in input order)."""
    if not items:
        return
    try:
        import ray
        import ray.data
    except ImportError:
        raise BackendUnavailable("edgevl batch --ray needs Ray Data: pip install 'edgevl[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False             # edgevl batch draws its own
    ds = ray.data.from_items([{"source": it.source, "frame": -1 if it.frame is None else it.frame} for it in items],
                             override_num_blocks=max(1, min(len(items), actors * 4)))
    ds = ds.map_batches(Answerer, fn_constructor_kwargs={"bundle": str(bundle), "prompt": prompt, "sampling": sampling,
                                                         "backend": backend, "threads": threads},
                        batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
                        compute=ray.data.ActorPoolStrategy(size=actors))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["id"])):
            rec = {k: batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i] for k in FIELDS}
            rec["frame"] = None if rec["frame"] < 0 else int(rec["frame"])
            yield rec
