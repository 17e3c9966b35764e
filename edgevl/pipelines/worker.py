"""One worker thread per source: takes the latest frame, decides whether it changed, asks the model.

Each worker has at most one request in flight, so with N sources up to N requests reach the
model at once; with ``edgevl.load(..., batching=True)`` the dynamic batcher and the in-flight
scheduler serve them together (that is where batching across cameras comes from), without it
they take turns on one engine. Preprocessing happens here, once per frame (inside
``VLM.generate``), never on the capture thread.
"""

from __future__ import annotations

import queue
import threading
import time

from edgevl.pipelines.capture import FrameSlot
from edgevl.pipelines.health import Health
from edgevl.pipelines.metrics import SourceStats
from edgevl.pipelines.policy import ChangeDetector, thumbnail
from edgevl.pipelines.sinks import Answer
from edgevl.pipelines.sources import Frame

# generate()'s timing names -> the stage names answers carry
_STAGE_NAMES = {"total": "model_total", "decode_total": "decode"}
_DROPPED_TIMINGS = ("decode_per_token",)


class SourceWorker(threading.Thread):
    def __init__(self, vlm, source_name: str, prompt: str, slot: FrameSlot, results: "queue.Queue",
                 stats: SourceStats, health: Health, stop: threading.Event, detector: ChangeDetector | None = None,
                 sampling: dict | None = None, keep_frames: bool = False, sink_alive=lambda: True):
        super().__init__(name=f"worker-{source_name}", daemon=True)
        self.vlm, self.source_name, self.prompt = vlm, source_name, prompt
        self.slot, self.results, self.stats, self.health, self.stop = slot, results, stats, health, stop
        self.detector, self.sampling, self.keep_frames = detector, dict(sampling or {}), keep_frames
        self.sink_alive = sink_alive
        self.component = f"worker:{source_name}"
        self._last: tuple[str, int, int] | None = None      # (answer, tokens, frame index) of the last model answer

    def run(self) -> None:
        self.health.set_state(self.component, "running")
        try:
            while True:
                frame = self.slot.take(self.stop)
                if frame is None:
                    break
                self.handle(frame)
            self.health.set_state(self.component, "done")
        except BaseException as e:          # a bug: report it and end this source's answers only
            self.health.error(self.component, "crashed", f"worker of {self.source_name} died: {e!r}", e)
            self.health.set_state(self.component, "failed")

    def handle(self, frame: Frame) -> Answer | None:
        t_take = time.perf_counter()
        latency = {"slot_wait": (t_take - frame.captured_mono) * 1e3}
        thumb = None
        if self.detector is not None:
            thumb = thumbnail(frame.image)
            latency["change_check"] = (time.perf_counter() - t_take) * 1e3
        if thumb is not None and self._last is not None and self.detector.unchanged(thumb):
            text, tokens, source_index = self._last
            answer = self._answer(frame, text, tokens, latency, reused_from=source_index)
        else:
            try:
                result = self.vlm.generate(frame.image, self.prompt, channels="bgr", **self.sampling)
            except Exception as e:
                self.stats.count("failed")
                self.health.error(self.component, "model_error",
                                  f"model failed on frame {frame.index} of {self.source_name}: {e}", e)
                return None
            for name, value in result.timings_ms.items():
                if name not in _DROPPED_TIMINGS:
                    latency[_STAGE_NAMES.get(name, name)] = value
            if thumb is not None:
                self.detector.remember(thumb)
            self._last = (result.text, len(result.tokens), frame.index)
            answer = self._answer(frame, result.text, len(result.tokens), latency)
        self._emit(answer)
        return answer

    def _answer(self, frame: Frame, text: str, tokens: int, latency: dict, reused_from: int | None = None) -> Answer:
        latency["capture_to_answer"] = (time.perf_counter() - frame.captured_mono) * 1e3
        latency = {k: round(float(v), 3) for k, v in latency.items()}
        self.stats.answered(latency["capture_to_answer"], reused=reused_from is not None)
        return Answer(frame.source, frame.index, frame.position, frame.captured_at, frame.stream_time, self.prompt,
                      text, reused_from is not None, reused_from, latency, tokens,
                      frame.image if self.keep_frames else None)

    def _emit(self, answer: Answer) -> None:
        # bounded hand-over to the sinks: a slow sink holds this worker back (its capture thread
        # keeps only the latest frame meanwhile); an answer already counted is never thrown away
        while True:
            try:
                self.results.put(answer, timeout=0.2)
                return
            except queue.Full:
                if not self.sink_alive():
                    self.health.error(self.component, "sink_gone", f"answer for frame {answer.frame_index} of "
                                      f"{self.source_name} could not be delivered: the sink thread is gone")
                    return
