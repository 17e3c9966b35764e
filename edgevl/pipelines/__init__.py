"""Camera and video stream pipelines: answer a prompt about live frames from several sources.

    from edgevl.pipelines import run_stream
    report = run_stream("bundle/", ["0", "rtsp://cam/stream", "clip.mp4"], "describe the image.",
                        fps=2, jsonl="answers.jsonl", metrics="metrics.json")

OpenCV (``pip install 'edgevl[camera]'``) is imported only when a source opens or a video is
written, so importing this package costs nothing without it.
"""

from edgevl.pipelines.capture import Reconnect
from edgevl.pipelines.health import Health
from edgevl.pipelines.policy import FramePolicy
from edgevl.pipelines.sinks import Answer, CallbackSink, ConsoleSink, JsonlSink, Sink, VideoSink, WindowSink
from edgevl.pipelines.sources import (ArraySource, Frame, GStreamerSource, ImageFolderSource, Source, SourceDropped,
                                      StreamURLSource, VideoFileSource, WebcamSource, parse_source)
from edgevl.pipelines.stream import StreamPipeline, StreamReport, run_stream

__all__ = [
    "Answer", "ArraySource", "CallbackSink", "ConsoleSink", "Frame", "FramePolicy", "GStreamerSource", "Health",
    "ImageFolderSource", "JsonlSink", "Reconnect", "Sink", "Source", "SourceDropped", "StreamPipeline",
    "StreamReport", "StreamURLSource", "VideoFileSource", "VideoSink", "WebcamSource", "WindowSink",
    "parse_source", "run_stream",
]
