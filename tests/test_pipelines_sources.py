"""Sources, the one-frame slot, capture threads and reconnection (no model needed)."""

from __future__ import annotations

import functools
import http.server
import re
import threading
import time

import numpy as np
import pytest

from conftest import needs_cv2
from edgevl.errors import ConfigError, SourceError
from edgevl.pipelines.capture import CaptureThread, FrameSlot, Reconnect
from edgevl.pipelines.health import Health
from edgevl.pipelines.metrics import SourceStats
from edgevl.pipelines.policy import FrameGate
from edgevl.pipelines.sources import (ArraySource, Frame, GStreamerSource, ImageFolderSource, SourceDropped,
                                      StreamURLSource, VideoFileSource, WebcamSource, parse_source, unique_names)
from pipelines_fakes import FlakySource, RaisingSource, gray_frames, sample_factory  # noqa: F401 (fixture)

FAST = Reconnect(max_attempts=3, initial_delay=0.01, max_delay=0.02)


def test_parse_source_recognises_each_kind(tmp_path):
    clip = tmp_path / "clip.avi"
    clip.write_bytes(b"x")
    assert isinstance(parse_source("0"), WebcamSource) and parse_source("0").name == "cam0"
    assert isinstance(parse_source("/dev/video2"), WebcamSource)
    assert isinstance(parse_source("rtsp://10.0.0.2:554/stream1"), StreamURLSource)
    assert isinstance(parse_source("http://cam.local/video.mjpg"), StreamURLSource)
    gst = parse_source("nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280 ! nvvidconv ! appsink")
    assert isinstance(gst, GStreamerSource)
    assert isinstance(parse_source(str(tmp_path)), ImageFolderSource)
    s = parse_source(str(clip))
    assert isinstance(s, VideoFileSource) and s.name == "clip"
    named = parse_source(f"front={clip}")
    assert named.name == "front" and named.target == str(clip)
    url = parse_source("door=rtsp://user:pw@cam/stream?x=1")
    assert url.name == "door" and url.target == "rtsp://user:pw@cam/stream?x=1"


def test_parse_source_names_a_missing_path():
    with pytest.raises(SourceError, match="no_such_clip.mp4"):
        parse_source("/tmp/definitely/no_such_clip.mp4")


def test_unique_names():
    sources = [ArraySource("cam", []), ArraySource("cam", []), ArraySource("other", [])]
    unique_names(sources)
    assert [s.name for s in sources] == ["cam", "cam-2", "other"]


@needs_cv2
def test_open_failures_name_the_source(tmp_path):
    with pytest.raises(SourceError, match="missing.mp4.*no such file"):
        VideoFileSource("missing", tmp_path / "missing.mp4").open()
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(SourceError, match="not_a_video.mp4"):
        VideoFileSource("bad", bad).open()
    with pytest.raises(SourceError, match="camera 97"):
        WebcamSource("cam97", 97).open()
    with pytest.raises(SourceError, match="empty.*no images"):
        (tmp_path / "empty").mkdir()
        ImageFolderSource("empty", tmp_path / "empty").open()


@needs_cv2
def test_gstreamer_without_gstreamer_support_says_so():
    import cv2

    if re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()):
        pytest.skip("this OpenCV has GStreamer; the error path is for builds without it")
    with pytest.raises(SourceError, match="without GStreamer"):
        GStreamerSource("gst", "videotestsrc ! appsink").open()


@needs_cv2
def test_network_stream_reads_frames_and_a_dead_one_is_named(sample_factory):
    sample = sample_factory(scenes=1, frames_per_scene=6)
    handler = functools.partial(QuietHandler, directory=str(sample.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{sample.path.name}"
        src = parse_source(f"door={url}").open()
        assert isinstance(src, StreamURLSource) and src.live
        frames = [src.read() for _ in range(6)]
        assert all(f.shape == (128, 128, 3) for f in frames)
        with pytest.raises(SourceDropped, match="stopped delivering"):     # a live stream has no clean end
            src.read()
        src.close()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(SourceError, match=f"127.0.0.1:{server.server_port}"):
        StreamURLSource("dead", url).open()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@needs_cv2
def test_image_folder_reads_in_name_order_then_ends(tmp_path):
    import cv2

    for i in (2, 0, 1):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((8, 8, 3), 10 * i, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    src = ImageFolderSource("f", tmp_path).open()
    assert src.frame_count == 3
    assert [int(src.read().mean()) for _ in range(3)] == [0, 10, 20]
    assert src.read() is None


@needs_cv2
def test_truncated_video_is_a_drop_not_an_end(sample_factory, tmp_path):
    sample = sample_factory(scenes=2, frames_per_scene=10)
    data = sample.path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    src = VideoFileSource("cut", cut).open()
    frames = 0
    with pytest.raises(SourceDropped, match="ended at frame"):
        while src.read() is not None:
            frames += 1
    assert 0 < frames < 20
    whole = VideoFileSource("whole", sample.path).open()
    n = 0
    while whole.read() is not None:                     # a complete file just ends
        n += 1
    assert n == 20


def _frame(i: int) -> Frame:
    return Frame("s", i, np.zeros((2, 2, 3), np.uint8), 0.0, time.perf_counter(), i / 30)


def test_slot_keeps_only_the_latest_frame():
    slot, stop = FrameSlot(), threading.Event()
    assert slot.put(_frame(0), stop) is None
    assert slot.put(_frame(1), stop).index == 0          # replaced: stale
    assert slot.put(_frame(2), stop).index == 1
    assert slot.take(stop).index == 2
    slot.close()
    assert slot.take(stop) is None                       # closed and empty: the worker ends


def test_slot_can_hold_the_producer_back():
    slot, stop = FrameSlot(), threading.Event()
    slot.put(_frame(0), stop)
    done = []
    t = threading.Thread(target=lambda: done.append(slot.put(_frame(1), stop, wait_until_taken=True)))
    t.start()
    time.sleep(0.15)
    assert t.is_alive()                                   # waiting, not replacing
    assert slot.take(stop).index == 0
    t.join(2)
    assert done == [None] and slot.take(stop).index == 1


def test_reconnect_backoff_is_exponential_and_bounded():
    r = Reconnect(max_attempts=6, initial_delay=0.5, max_delay=4.0, factor=2.0)
    assert [r.delay(k) for k in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    with pytest.raises(ConfigError):
        Reconnect(max_attempts=-1)


def _capture(source, pace="all", gate=None, reconnect=FAST, loop=False):
    health, stop, slot = Health(), threading.Event(), FrameSlot()
    stats = SourceStats(source.name)
    source.open()
    thread = CaptureThread(source, slot, gate or FrameGate(None, None), stats, health, stop, pace, reconnect, loop)
    taken = []

    def consume():
        while (f := slot.take(stop)) is not None:
            taken.append(f)

    consumer = threading.Thread(target=consume)
    thread.start()
    consumer.start()
    return thread, consumer, taken, stats, health, stop


def _kinds(health, component):
    return [e.kind for e in health.events if e.component == component]


def test_dropped_source_is_reopened_with_backoff_and_continues():
    src = FlakySource("flaky", gray_frames(12), drop_at=5, failed_reopens=2)
    thread, consumer, taken, stats, health, _ = _capture(src)
    thread.join(5), consumer.join(5)
    assert [int(f.image.mean()) for f in taken] == list(range(12))      # resumed where it dropped
    assert [f.index for f in taken] == list(range(12))
    kinds = _kinds(health, "source:flaky")
    assert kinds.count("reconnecting") == 3 and kinds.count("reconnect_failed") == 2
    assert "dropped" in kinds and "reconnected" in kinds and kinds[-1] == "ended"
    c = health.component("source:flaky")
    assert (c.state, c.reconnect_attempts, c.reconnects) == ("ended", 3, 1)
    assert health.ok


def test_source_that_never_comes_back_gives_up_after_bounded_attempts():
    src = FlakySource("gone", gray_frames(12), drop_at=4, failed_reopens=None)
    thread, consumer, taken, stats, health, _ = _capture(src)
    thread.join(5), consumer.join(5)
    assert len(taken) == 4
    c = health.component("source:gone")
    assert c.state == "failed" and c.reconnect_attempts == FAST.max_attempts
    assert _kinds(health, "source:gone")[-1] == "gave_up"
    assert not health.ok


def test_unexpected_exception_from_a_reader_counts_as_a_drop():
    src = RaisingSource("boom", gray_frames(6), at=3)
    thread, consumer, taken, _, health, _ = _capture(src)
    thread.join(5), consumer.join(5)
    assert len(taken) == 6
    assert any("driver exploded" in e.message for e in health.events)


def test_realtime_pace_drops_stale_frames_and_counts_them():
    src = ArraySource("fast", gray_frames(30), fps=300.0)      # 0.1 s of video
    health, stop, slot, stats = Health(), threading.Event(), FrameSlot(), SourceStats("fast")
    src.open()
    thread = CaptureThread(src, slot, FrameGate(None, None), stats, health, stop, "realtime", FAST)
    thread.start()
    thread.join(5)
    last = slot.take(stop)                                     # nobody took frames: only the last is left
    assert last.index == 29
    assert stats.counts["captured"] == 30 and stats.counts["dropped_stale"] == 29


def test_loop_restarts_a_file_and_keeps_counting():
    src = ArraySource("loop", gray_frames(4))
    thread, consumer, taken, _, _, stop = _capture(src, loop=True)
    while len(taken) < 10:
        time.sleep(0.01)
    stop.set()
    thread.join(5), consumer.join(5)
    assert [f.index for f in taken[:10]] == list(range(10))
    assert [f.position for f in taken[:10]] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert taken[5].stream_time == pytest.approx(5 / 30)
