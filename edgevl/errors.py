"""One error root for everything edgevl raises on purpose.

A message says what was asked, what exists, and what to do about it. Callers that want to
handle a class of failure catch the narrow subclass; a CLI catches ``EdgeVLError`` and prints
the message without a traceback.
"""

from concurrent.futures import CancelledError as _FutureCancelled


class EdgeVLError(Exception):
    """Root of every error edgevl raises deliberately."""


class ConfigError(EdgeVLError, ValueError):
    """A configuration, flag or argument that cannot work."""


class InputError(EdgeVLError, ValueError):
    """Bad user input: an image that cannot be decoded, a prompt that is too long, a wrong shape."""


class ExportError(EdgeVLError):
    """A model (or one of its ops) could not be exported to ONNX."""


class ParityError(ExportError):
    """An exported or compiled part disagrees with its reference past the tolerance."""


class UnsupportedArchitecture(EdgeVLError):
    """A checkpoint whose architecture has no export spec."""


class CheckpointError(EdgeVLError):
    """A checkpoint directory that is missing files or cannot be read."""


class BundleError(EdgeVLError):
    """A bundle that is missing, incomplete, tampered with, or from a newer edgevl."""


class BackendUnavailable(EdgeVLError):
    """A backend (runtime library or device) that is not installed or not usable here."""


class BackendError(EdgeVLError):
    """A backend that ran a part but returned an impossible result (e.g. an empty output)."""


class CompileError(EdgeVLError):
    """A bundle part that a target compiler (TensorRT, OpenVINO, ...) could not build."""


class EngineMismatch(BundleError):
    """A compiled engine built for another TensorRT version, GPU or ONNX file; rebuild it here."""


class QuantizationError(EdgeVLError):
    """Calibration data or a quantization recipe that cannot produce a usable model."""


class AccuracyBudgetExceeded(QuantizationError):
    """A quantized model lost more accuracy than its budget allows."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class QueueFull(EdgeVLError):
    """The batcher's bounded queue is full; retry later or raise max_queue_size."""


class RequestCancelled(EdgeVLError, _FutureCancelled):
    """A request was cancelled before it finished (also a concurrent.futures.CancelledError,
    so one ``except CancelledError`` covers ``future.cancel()`` and a cancelled generation)."""


class DeadlineExceeded(EdgeVLError, TimeoutError):
    """A request's deadline passed before it was served."""


class ShutdownError(EdgeVLError):
    """The batcher or scheduler was shut down before the request was served."""


class SourceError(EdgeVLError):
    """A camera, video file or stream that cannot be opened or stopped delivering frames."""
