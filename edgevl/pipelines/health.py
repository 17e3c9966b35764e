"""The health channel: every fault a pipeline thread meets is recorded here, never only logged.

Threads report events (a source reconnecting, a model call failing, a sink that could not
write); listeners (the console) see each as it happens, and the final report carries the
state of every source and sink plus the events, so a caller can tell a clean run from one that
limped along. A thread that dies reports why before it goes.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

# A source's life: opening -> running <-> reconnecting -> ended | failed | stopped
SOURCE_STATES = ("opening", "running", "reconnecting", "ended", "failed", "stopped")
MAX_EVENTS = 1000          # the report keeps the first and the last events beyond this; counts stay exact


@dataclass
class HealthEvent:
    time: float                 # wall clock
    component: str              # "source:cam0", "worker:cam0", "sink:jsonl", "pipeline"
    level: str                  # "info" | "warning" | "error"
    kind: str                   # "reconnecting", "reconnected", "gave_up", "ended", "model_error", ...
    message: str
    detail: str | None = None   # a traceback for unexpected exceptions

    def to_dict(self) -> dict:
        d = {"time": round(self.time, 3), "component": self.component, "level": self.level,
             "kind": self.kind, "message": self.message}
        if self.detail:
            d["detail"] = self.detail
        return d

    def line(self) -> str:
        return f"[{self.level}] {self.component}: {self.message}"


@dataclass
class ComponentHealth:
    state: str = "opening"
    errors: int = 0
    warnings: int = 0
    reconnect_attempts: int = 0
    reconnects: int = 0
    last_error: str | None = None
    extra: dict = field(default_factory=dict)


class Health:
    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[HealthEvent] = []
        self._dropped_events = 0
        self.components: dict[str, ComponentHealth] = {}
        self.listeners: list[Callable[[HealthEvent], None]] = []

    def component(self, name: str) -> ComponentHealth:
        with self._lock:
            return self.components.setdefault(name, ComponentHealth())

    def set_state(self, name: str, state: str) -> None:
        self.component(name).state = state

    def report(self, component: str, kind: str, message: str, level: str = "info",
               exc: BaseException | None = None) -> HealthEvent:
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc is not None else None
        event = HealthEvent(time.time(), component, level, kind, message, detail)
        c = self.component(component)
        with self._lock:
            if level == "error":
                c.errors += 1
                c.last_error = message
            elif level == "warning":
                c.warnings += 1
            if len(self._events) < MAX_EVENTS:
                self._events.append(event)
            else:                               # keep the first half, roll the second
                self._events.pop(MAX_EVENTS // 2)
                self._events.append(event)
                self._dropped_events += 1
            listeners = list(self.listeners)
        for listen in listeners:
            try:
                listen(event)
            except Exception:                   # a broken listener must not take a worker down
                pass
        return event

    def info(self, component: str, kind: str, message: str) -> HealthEvent:
        return self.report(component, kind, message, "info")

    def warning(self, component: str, kind: str, message: str, exc: BaseException | None = None) -> HealthEvent:
        return self.report(component, kind, message, "warning", exc)

    def error(self, component: str, kind: str, message: str, exc: BaseException | None = None) -> HealthEvent:
        return self.report(component, kind, message, "error", exc)

    @property
    def events(self) -> list[HealthEvent]:
        with self._lock:
            return list(self._events)

    @property
    def ok(self) -> bool:
        """No errors and no source that gave up."""
        with self._lock:
            return all(c.errors == 0 and c.state != "failed" for c in self.components.values())

    def to_dict(self) -> dict:
        with self._lock:
            comps = {name: {"state": c.state, "errors": c.errors, "warnings": c.warnings,
                            "reconnect_attempts": c.reconnect_attempts, "reconnects": c.reconnects,
                            "last_error": c.last_error, **c.extra}
                     for name, c in self.components.items()}
            events = [e.to_dict() for e in self._events]
            ok = all(c.errors == 0 and c.state != "failed" for c in self.components.values())
        return {"ok": ok, "components": comps, "events": events, "events_not_kept": self._dropped_events}
