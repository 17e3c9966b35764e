"""Frame policy: rate and every-Nth gates, and the unchanged-frame detector."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_cv2
from edgevl.errors import ConfigError
from edgevl.pipelines.policy import ChangeDetector, FrameGate, FramePolicy, thumbnail


def _admitted(gate: FrameGate, n: int, fps: float) -> list[int]:
    return [i for i in range(n) if gate.admit(i, i / fps)]


def test_every_nth_frame():
    assert _admitted(FrameGate(None, 4), 13, 30) == [0, 4, 8, 12]


def test_rate_is_in_stream_time_and_does_not_drift():
    # a 15 fps stream at 5 answers/s: every third frame, exactly, for a long time
    assert _admitted(FrameGate(5, None), 300, 15) == list(range(0, 300, 3))
    # 30 fps at 7 answers/s: 7 frames in each second of stream, never two in a row
    picked = _admitted(FrameGate(7, None), 300, 30)
    assert len(picked) == 70 and min(np.diff(picked)) >= 4


def test_rate_after_a_stall_does_not_burst():
    gate = FrameGate(2, None)
    assert gate.admit(0, 0.0)
    assert gate.admit(1, 10.0)          # after 10 s without frames: one frame, then the rate again
    assert not gate.admit(2, 10.1)
    assert gate.admit(3, 10.5)


def test_no_policy_admits_everything():
    assert _admitted(FrameGate(None, None), 10, 30) == list(range(10))


@pytest.mark.parametrize("kwargs, match", [
    ({"fps": 2, "every": 3}, "not both"), ({"fps": 0}, "positive"), ({"every": 0}, ">= 1"),
    ({"every": 1.5}, "whole number"), ({"skip_unchanged": 300}, "0..255"),
])
def test_bad_policies_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FramePolicy(**kwargs)


@needs_cv2
def test_change_detector_ignores_noise_and_sees_a_new_scene():
    from edgevl.data.world import make_scene
    from edgevl.pipelines.sample import frame_image

    rng = np.random.default_rng(0)
    a = frame_image(make_scene("test", 0), 256)
    noisy = np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)
    other = frame_image(make_scene("test", 1), 256)
    d = ChangeDetector(3.0)
    assert not d.unchanged(thumbnail(a))                 # nothing to compare with yet
    d.remember(thumbnail(a))
    assert d.unchanged(thumbnail(a)) and d.difference(thumbnail(a)) == 0.0
    assert d.unchanged(thumbnail(noisy))                 # sensor noise averages out in the thumbnail
    assert not d.unchanged(thumbnail(other))
    assert d.difference(thumbnail(other)) > 10
