"""Setup -> the worker's subject spec: resolve the model, build or reuse the bundle.

Runs in the orchestrating process before any worker starts; an exception here fails that
setup only (orchestrate.py records it as the variant's error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgevl.benchmarks.bundles import build_bundle, bundle_target, cache_key, cached_bundle
from edgevl.benchmarks.models import BenchModel, checkpoint_hash, resolve_model
from edgevl.benchmarks.variants import EDGEVL_TOOL, Setup


class Preparer:
    def __init__(self, cache_dir: Path, threads: int | None, rebuild: bool = False,
                 log: Callable[[str], None] = print):
        self.cache_dir, self.threads, self.rebuild, self.log = Path(cache_dir), threads, rebuild, log
        self._models: dict[str, BenchModel] = {}
        self._hashes: dict[str, str] = {}

    def model(self, name: str) -> BenchModel:
        if name not in self._models:
            self._models[name] = resolve_model(name, self.cache_dir)
        return self._models[name]

    def checkpoint_hash(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = checkpoint_hash(self.model(name).checkpoint)
        return self._hashes[name]

    def bundle(self, model_name: str, target: str, precision: str) -> tuple[Path, bool, str]:
        """(path, reused?, cache key) of the edgevl bundle for (model, target, precision)."""
        bm = self.model(model_name)
        built_for = bundle_target(target, precision)
        key = cache_key(self.checkpoint_hash(model_name), built_for, precision)
        path, reused = cached_bundle(
            self.cache_dir, bm.name, key,
            lambda out: build_bundle(bm.checkpoint, built_for, precision, out, log=self.log), self.rebuild)
        self.log(f"bench: {bm.name} {built_for}/{precision} bundle {'reused' if reused else 'built'}: {path}")
        return path, reused, key

    def __call__(self, setup: Setup) -> dict:
        bm = self.model(setup.model)
        spec = self._spec(setup, bm)
        spec["accuracy"] = bm.measures_accuracy      # random-weight models have no accuracy to measure
        return spec

    def _spec(self, setup: Setup, bm: BenchModel) -> dict:
        if setup.is_reference:
            kind = "pytorch-tiny" if bm.kind == "edgevl-tiny" else "pytorch-hf"
            return {"kind": kind, "checkpoint": str(bm.checkpoint), "threads": self.threads,
                    "prepared": {"checkpoint": str(bm.checkpoint)}}
        if setup.tool == EDGEVL_TOOL:
            path, reused, key = self.bundle(setup.model, setup.backend, setup.precision)
            return {"kind": "edgevl", "bundle": str(path), "backend": setup.backend, "precision": setup.precision,
                    "threads": self.threads, "prepared": {"bundle": str(path), "reused": reused, "cache_key": key}}
        from edgevl.benchmarks.peers import prepare_peer

        return prepare_peer(setup, bm, self)
