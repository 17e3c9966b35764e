"""edgevl stream: answer a prompt about live frames from cameras, video files, streams or folders."""

from __future__ import annotations

import argparse

SOURCE_HELP = ("a camera index (0) or /dev/videoN, a video file, an rtsp:// or http(s):// URL, a GStreamer "
               "pipeline ending in appsink (e.g. \"nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,"
               "height=720 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
               "appsink\"), or a folder of images; NAME=SOURCE names it; repeat for several sources")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--source", action="append", required=True, metavar="SRC", help=SOURCE_HELP)
    p.add_argument("--prompt", required=True, help="the question asked about every selected frame")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=float, default=None, help="at most F answers per second per source")
    rate.add_argument("--every", type=int, default=None, metavar="N", help="answer every Nth frame of each source")
    p.add_argument("--skip-unchanged", type=float, default=None, metavar="T",
                   help="reuse the last answer when a frame differs from the last answered one by less than T "
                        "(mean absolute difference of 32x32 gray thumbnails, 0..255; 2-6 suits a still camera)")
    p.add_argument("--jsonl", default=None, metavar="PATH", help="write one JSON line per answer")
    p.add_argument("--video", default=None, metavar="PATH",
                   help="write answered frames with their answers drawn on (.mp4 or .avi; one file per source "
                        "when there are several: PATH-<source>.mp4)")
    p.add_argument("--metrics", default=None, metavar="PATH", help="write the end-of-run metrics and health as JSON")
    p.add_argument("--window", action="store_true", help="show each source in a window (needs a display)")
    p.add_argument("--backend", default=None, help="onnxruntime, openvino or tensorrt (default: best installed)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per model part (default: half the cores; capture and preprocessing use the rest)")
    batching = p.add_mutually_exclusive_group()
    batching.add_argument("--batching", dest="batching", action="store_true", default=None,
                          help="batch frames of several sources (default: on with several sources)")
    batching.add_argument("--no-batching", dest="batching", action="store_false")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch across sources (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long the image batcher waits to fill a batch (default 0: it takes the frames that "
                        "are waiting; the decoder, not vision, is what fuller batches pay off on)")
    p.add_argument("--no-drop", action="store_true",
                   help="files and folders: read no faster than the model answers, so no selected frame is "
                        "dropped (offline processing); default: played at their frame rate, like a camera")
    p.add_argument("--loop", action="store_true", help="files and folders: start again at the end")
    p.add_argument("--folder-fps", type=float, default=5.0, help="frame rate of image folders (default 5)")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--reconnect-attempts", type=int, default=5,
                   help="reopen a dropped source at most this many times in a row (default 5)")
    p.add_argument("--reconnect-delay", type=float, default=0.5,
                   help="first reconnect delay in seconds; doubles per attempt up to 8 s (default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--quiet", action="store_true", help="no live answer lines (the summary is still printed)")


def run(args) -> int:
    from edgevl.pipelines.capture import Reconnect
    from edgevl.pipelines.stream import run_stream

    reconnect = Reconnect(max_attempts=args.reconnect_attempts, initial_delay=args.reconnect_delay,
                          max_delay=max(8.0, args.reconnect_delay))
    report = run_stream(
        args.bundle, args.source, args.prompt, fps=args.fps, every=args.every, skip_unchanged=args.skip_unchanged,
        jsonl=args.jsonl, video=args.video, metrics=args.metrics, console=not args.quiet, verbose=True, window=args.window,
        backend=args.backend, threads=args.threads, batching=args.batching, max_batch_size=args.max_batch,
        max_wait_ms=args.max_wait_ms, no_drop=args.no_drop, loop=args.loop, reconnect=reconnect,
        duration=args.duration, folder_fps=args.folder_fps,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0 if report.ok else 1
