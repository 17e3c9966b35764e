"""One capture thread per source: read, stamp, gate, and hand over through a one-frame slot.

Latest frame wins: the slot holds one frame and a newer one replaces it (the replaced frame is
counted as dropped), so when the model is slower than the camera the answer is about a frame
at most one frame period old, and no queue grows behind it. Files and image folders are played
at their frame rate like a camera ("realtime") or, with ``pace="all"``, read no faster than the
model takes frames (every frame answered, offline processing).

A stream that drops is closed and reopened with exponential backoff, bounded in attempts, each
attempt reported to the health channel; the other sources' threads never wait on it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from edgevl.errors import ConfigError
from edgevl.pipelines.health import Health
from edgevl.pipelines.metrics import SourceStats
from edgevl.pipelines.policy import FrameGate
from edgevl.pipelines.sources import Frame, Source, now

PACES = ("live", "realtime", "all")
DEFAULT_FPS = 30.0          # when a file does not say its frame rate
MAX_LAG_S = 0.5             # a file played in realtime that falls this far behind restarts its clock


@dataclass(frozen=True)
class Reconnect:
    """Backoff for a dropped source: attempt k waits min(max_delay, initial_delay * factor**(k-1))."""

    max_attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 8.0
    factor: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 0 or self.initial_delay < 0 or self.max_delay < self.initial_delay or self.factor < 1:
            raise ConfigError(f"bad reconnect policy {self}: need max_attempts >= 0, 0 <= initial_delay "
                              "<= max_delay and factor >= 1")

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.initial_delay * self.factor ** max(0, attempt - 1))


class FrameSlot:
    """A one-frame hand-over between a capture thread and its worker."""

    def __init__(self):
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False

    def put(self, frame: Frame, stop: threading.Event, wait_until_taken: bool = False) -> Frame | None:
        """Offer ``frame``; returns the frame that was dropped for it (the stale one), if any.
        With ``wait_until_taken`` it blocks while the slot is full instead (no drops)."""
        with self._cond:
            while wait_until_taken and self._frame is not None and not stop.is_set():
                self._cond.wait(0.1)
            if stop.is_set() and wait_until_taken:
                return frame
            stale, self._frame = self._frame, frame
            self._cond.notify_all()
            return stale

    def take(self, stop: threading.Event) -> Frame | None:
        """The latest frame, waiting for one; None once the slot is closed and empty or on stop."""
        with self._cond:
            while self._frame is None and not self._closed and not stop.is_set():
                self._cond.wait(0.1)
            if stop.is_set():
                return None
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def clear(self) -> Frame | None:
        with self._cond:
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame


class CaptureThread(threading.Thread):
    """Reads an opened ``source`` until it ends, fails for good, or ``stop`` is set."""

    def __init__(self, source: Source, slot: FrameSlot, gate: FrameGate, stats: SourceStats, health: Health,
                 stop: threading.Event, pace: str = "realtime", reconnect: Reconnect = Reconnect(),
                 loop: bool = False, playback_fps: float | None = None):
        super().__init__(name=f"capture-{source.name}", daemon=True)
        if pace not in PACES:
            raise ConfigError(f"unknown pace {pace!r}; expected one of {PACES}")
        if source.live and pace != "live":
            pace = "live"       # a camera cannot be held back: its driver would queue stale frames
        self.source, self.slot, self.gate, self.stats, self.health = source, slot, gate, stats, health
        self.stop, self.pace, self.reconnect, self.loop = stop, pace, reconnect, loop
        self.fps = float(playback_fps or source.fps or DEFAULT_FPS)
        self.component = f"source:{source.name}"
        self.count = 0                      # frames delivered so far (the next frame's index)
        self._loop_base = 0                 # frames of the file played in earlier loops
        self._failures = 0                  # reconnect attempts since the last good frame
        self._clock_base: float | None = None
        self._live_start: float | None = None

    # -- thread ------------------------------------------------------------------------------
    def run(self) -> None:
        self.health.set_state(self.component, "running")
        try:
            self._capture()
        except BaseException as e:          # a bug, not a stream fault: report it, end this source only
            self.health.error(self.component, "crashed", f"capture thread of {self.source.describe()} died: {e!r}", e)
            self.health.set_state(self.component, "failed")
        finally:
            self.slot.close()
            self.source.close()
            self.stats.mark_ended()
            if self.health.component(self.component).state in ("running", "reconnecting", "opening"):
                self.health.set_state(self.component, "stopped")

    def _capture(self) -> None:
        while not self.stop.is_set():
            if self.pace == "realtime":
                self._wait_until_due()
            try:
                image = self.source.read()
            except Exception as e:
                if not self._reconnect(e):
                    return
                continue
            if image is None:
                if self.loop and self.source.position > 0:
                    self._loop_base += self.source.position
                    self.source.seek(0)
                    continue
                self.health.info(self.component, "ended", f"{self.source.describe()} ended after "
                                 f"{self.count} frames")
                self.health.set_state(self.component, "ended")
                return
            self._deliver(image)

    def _deliver(self, image) -> None:
        wall, mono = now()
        if self._failures:
            c = self.health.component(self.component)
            c.reconnects += 1
            self.health.info(self.component, "reconnected", f"{self.source.describe()} is back after "
                             f"{self._failures} reconnect attempt(s)")
            self._failures = 0
        position = self.source.position - 1
        if self.source.live:
            self._live_start = mono if self._live_start is None else self._live_start
            stream_time = mono - self._live_start
        else:
            stream_time = (self._loop_base + position) / self.fps
        frame = Frame(self.source.name, self.count, image, wall, mono, stream_time,
                      None if self.source.live else position)
        self.count += 1
        self.stats.count("captured")
        if not self.gate.admit(frame.index, stream_time):
            self.stats.count("dropped_policy")
            return
        stale = self.slot.put(frame, self.stop, wait_until_taken=self.pace == "all")
        if stale is not None:
            self.stats.count("dropped_stale")

    def _wait_until_due(self) -> None:
        """Sleep until the next frame's media time, as a camera would deliver it."""
        next_time = (self._loop_base + self.source.position) / self.fps
        t = time.perf_counter()
        if self._clock_base is None or t - (self._clock_base + next_time) > MAX_LAG_S:
            self._clock_base = t - next_time
        delay = self._clock_base + next_time - t
        if delay > 0:
            self.stop.wait(delay)

    # -- faults ------------------------------------------------------------------------------
    def _reconnect(self, error: BaseException) -> bool:
        """Reopen after a drop, with backoff; False when attempts are spent or on stop."""
        c = self.health.component(self.component)
        self.health.set_state(self.component, "reconnecting")
        self.health.warning(self.component, "dropped", f"{self.source.describe()} dropped after frame "
                            f"{self.count}: {error}")
        self.source.close()
        position = self.source.position
        while not self.stop.is_set():
            self._failures += 1
            if self._failures > self.reconnect.max_attempts:
                self.health.error(self.component, "gave_up", f"gave up on {self.source.describe()} after "
                                  f"{self.reconnect.max_attempts} reconnect attempts; last error: {error}")
                self.health.set_state(self.component, "failed")
                return False
            c.reconnect_attempts += 1
            delay = self.reconnect.delay(self._failures)
            self.health.info(self.component, "reconnecting", f"reconnect attempt {self._failures}/"
                             f"{self.reconnect.max_attempts} in {delay:.2g} s")
            if self.stop.wait(delay):
                return False
            try:
                self.source.open()
                self.source.seek(position)
            except Exception as e:
                error = e
                self.health.warning(self.component, "reconnect_failed", f"reconnect attempt {self._failures}/"
                                    f"{self.reconnect.max_attempts} failed: {e}")
                self.source.close()
                continue
            self.health.set_state(self.component, "running")
            self._clock_base = None         # realtime playback resumes now, without a burst
            return True
        return False
