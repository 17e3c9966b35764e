"""Comparator: run several runners on the same feeds and measure how far their outputs drift.

A "runner" here is anything with ``infer(feeds) -> {name: array}``: a backend runner, the
PyTorch reference wrapper of the exporters, or a plain function wrapped in ``FnRunner``. Export
validation, the tests and ``edgevl compare`` all use this one class. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np

from edgevl.errors import ParityError


@dataclass
class OutputDiff:
    output: str
    max_abs: float
    mean_abs: float
    cosine: float
    shape: tuple

    def ok(self, atol: float, min_cosine: float) -> bool:
        return self.max_abs <= atol and self.cosine >= min_cosine


@dataclass
class PartReport:
    part: str
    reference: str
    candidate: str
    n_feeds: int
    atol: float
    min_cosine: float
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.ok(self.atol, self.min_cosine) for o in self.outputs)

    @property
    def worst(self) -> OutputDiff:
        return max(self.outputs, key=lambda o: o.max_abs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        w = self.worst
        status = "ok" if self.passed else "FAILED"
        return (f"{self.part}: {self.candidate} vs {self.reference} {status}: worst output {w.output!r} "
                f"max abs diff {w.max_abs:.3g} (tolerance {self.atol:g}), cosine {w.cosine:.7f}")


class FnRunner:
    """Adapts ``fn(feeds) -> dict`` to the runner surface the Comparator needs."""

    def __init__(self, fn: Callable[[dict], dict], name: str):
        self.fn, self.name = fn, name

    def infer(self, feeds: dict) -> dict:
        return self.fn(feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def diff_outputs(ref: dict, got: dict, names: Iterable[str] | None = None) -> list[OutputDiff]:
    diffs = []
    for name in names or ref:
        if name not in got:
            raise ParityError(f"output {name!r} is missing from the candidate (it has {sorted(got)})")
        r, g = np.asarray(ref[name]), np.asarray(got[name])
        if r.shape != g.shape:
            raise ParityError(f"output {name!r} has shape {g.shape}, reference has {r.shape}")
        d = np.abs(r.astype(np.float64) - g.astype(np.float64))
        diffs.append(OutputDiff(name, float(d.max(initial=0.0)), float(d.mean()) if d.size else 0.0,
                                cosine(r, g), tuple(r.shape)))
    return diffs


class Comparator:
    def __init__(self, atol: float = 1e-4, min_cosine: float = 0.9999):
        self.atol, self.min_cosine = atol, min_cosine

    def compare(self, part: str, reference, candidate, feeds_list: list[dict],
                ref_name: str = "reference", cand_name: str = "candidate") -> PartReport:
        """Per output, the worst max-abs diff and the lowest cosine over all feeds."""
        report = PartReport(part, ref_name, cand_name, len(feeds_list), self.atol, self.min_cosine)
        worst: dict[str, OutputDiff] = {}
        for feeds in feeds_list:
            for d in diff_outputs(reference.infer(feeds), candidate.infer(feeds)):
                w = worst.get(d.output)
                if w is None:
                    worst[d.output] = d
                else:
                    worst[d.output] = OutputDiff(d.output, max(w.max_abs, d.max_abs), max(w.mean_abs, d.mean_abs),
                                                 min(w.cosine, d.cosine), w.shape)
        report.outputs = list(worst.values())
        return report

    @staticmethod
    def require(report: PartReport) -> PartReport:
        """Raise ParityError naming the part, output, max abs diff and cosine if it failed."""
        if not report.passed:
            bad = [o for o in report.outputs if not o.ok(report.atol, report.min_cosine)]
            details = "; ".join(f"output {o.output!r}: max abs diff {o.max_abs:.3g} (tolerance {report.atol:g}), "
                                f"cosine {o.cosine:.6f} (minimum {report.min_cosine})" for o in bad)
            raise ParityError(f"part {report.part!r}: {report.candidate} disagrees with {report.reference}: {details}")
        return report
