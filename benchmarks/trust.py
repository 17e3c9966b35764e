"""Whether a ratio between measured variants can be trusted, and how to say so next to it.

A ratio printed plainly ("53.03x") reads as a fact. It is one only when each variant in it was
measured often enough, its samples agree with each other, and nothing else competed for the
cores: on a busy 2-core machine PyTorch's OpenMP threads starve first and a speed-up mostly
measures the other process. ``judge`` checks the three and returns a ``Trust``; its reasons go
next to the number (``format_ratio``) and into the JSON (``Trust.to_dict``). Every summary that
prints a ratio to a user goes through here: the demo, ``edgevl bench``'s table, quant_speed.py,
openvino_step.py, streams.py and batching.py.

Load is the 1-minute load average (runnable threads of every process) against the cores this
process may use: above them, something besides the measured code wanted CPU time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from edgevl.benchmarks.machine import usable_cores
from edgevl.benchmarks.stats import DEFAULT_SPREAD_LIMIT, Summary, summarize

OTHERS_LIMIT = 0.25      # of the usable cores, on average, taken by other processes while measuring
MIN_SAMPLES = 5          # with fewer, p10 and p90 are the extremes and the spread says nothing
RERUN = "rerun on a quiet machine"


@dataclass(frozen=True)
class Trust:
    """The verdict on one ratio (or several, added together): trustworthy when ``reasons`` is empty."""

    reasons: tuple[str, ...] = ()
    load_before: float | None = None
    load_after: float | None = None
    cores: int | None = None
    spread_limit: float = DEFAULT_SPREAD_LIMIT
    min_samples: int = MIN_SAMPLES

    @property
    def ok(self) -> bool:
        return not self.reasons

    def flag(self) -> str:
        """'' when trustworthy, else '[not trustworthy: reason; reason — rerun on a quiet machine]'."""
        return "" if self.ok else f"[not trustworthy: {'; '.join(self.reasons)} — {RERUN}]"

    def __add__(self, other: "Trust") -> "Trust":
        """Both verdicts at once (one sentence for several ratios): reasons merged, the machine's load last."""
        reasons = tuple(sorted(dict.fromkeys(self.reasons + other.reasons), key=lambda r: r.startswith("machine load")))
        return Trust(reasons, _first(self.load_before, other.load_before), _first(self.load_after, other.load_after),
                     _first(self.cores, other.cores), self.spread_limit, self.min_samples)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Trust":
        """Back from ``to_dict`` (a JSON document); None (nothing judged) is nothing to flag."""
        if not d:
            return cls()
        return cls(tuple(d["reasons"]), d.get("load_before"), d.get("load_after"), d.get("usable_cores"),
                   d.get("spread_limit", DEFAULT_SPREAD_LIMIT), d.get("min_samples", MIN_SAMPLES))

    def to_dict(self) -> dict:
        rounded = (lambda x: None if x is None else round(x, 2))
        return {"trustworthy": self.ok, "reasons": list(self.reasons), "load_before": rounded(self.load_before),
                "load_after": rounded(self.load_after), "usable_cores": self.cores,
                "spread_limit": self.spread_limit, "min_samples": self.min_samples}


def _first(a, b):
    return a if a is not None else b


def load_reason(load_before: float | None, load_after: float | None, cores: int,
                limit: float | None = None) -> str | None:
    """Why the machine counts as busy (load above ``limit``, default ``cores``), or None."""
    limit = cores if limit is None else limit
    busy = [f"{load:.1f} {when}" for load, when in ((load_before, "before"), (load_after, "while"))
            if load is not None and load > limit]
    return f"machine load {' / '.join(busy)} measuring on {cores} cores" if busy else None


def judge(samples: Mapping[str, Sequence[float] | Summary], *, load_before: float | None,
          load_after: float | None, cores: int | None = None, spread_limit: float = DEFAULT_SPREAD_LIMIT,
          min_samples: int = MIN_SAMPLES, unit: str = "ms", others_cores: float | None = None) -> Trust:
    """The verdict on a ratio between the variants of ``samples`` (name -> values or their Summary).

    Flags a variant with fewer than ``min_samples`` samples, one whose (p90 - p10) / median is
    above ``spread_limit``, and a load above the usable cores before or while measuring
    (``load_after`` is taken as measuring ends, so its 1-minute average covers the measuring).
    Pass an empty ``samples`` for a ratio with no spread to check (one timed window each).
    ``others_cores`` (machine.OthersCpu, for timing done in this process) flags other processes
    that kept more than OTHERS_LIMIT of the cores busy; it is the better test where this process
    itself has just loaded the machine, which the load average cannot tell from competition.
    """
    cores = cores or usable_cores()
    reasons = []
    for name, values in samples.items():
        s = values if isinstance(values, Summary) else (summarize(values, spread_limit) if len(values) else None)
        n = s.n if s else 0
        if n < min_samples:
            reasons.append(f"{name} has {n} sample{'s' * (n != 1)}, fewer than {min_samples}")
        elif s.spread > spread_limit:
            reasons.append(f"{name} spread {s.p10:.4g}-{s.p90:.4g} {unit} is {s.spread:.0%} of its median "
                           f"(limit {spread_limit:.0%})")
    busy = load_reason(load_before, load_after, cores)
    if busy:
        reasons.append(busy)
    if others_cores is not None and others_cores > OTHERS_LIMIT * cores:
        reasons.append(f"machine load: other processes kept {others_cores:.2f} of {cores} cores busy while "
                       "measuring")
    return Trust(tuple(reasons), load_before, load_after, cores, spread_limit, min_samples)


def _times(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def format_ratio(value: float | None, trust: Trust, digits: int = 2) -> str:
    """'3.41x', or '53.03x  [not trustworthy: ... — rerun on a quiet machine]'."""
    return _times(value, digits) if trust.ok else f"{_times(value, digits)}  {trust.flag()}"


def format_ratios(items: Sequence[tuple[str, float | None, Trust]], digits: int = 2) -> str:
    """Several named ratios in one sentence; when all are flagged, one flag with all their reasons ends it."""
    trusts = [t for _, _, t in items]
    if trusts and not any(t.ok for t in trusts):
        return ", ".join(f"{name} {_times(v, digits)}" for name, v, _ in items) + f"  {sum(trusts, Trust()).flag()}"
    return "; ".join(f"{name} {format_ratio(v, t, digits)}" for name, v, t in items)
