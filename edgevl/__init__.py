"""edgevl: compile vision-language models for edge devices, and run them with numpy + one backend.

``import edgevl`` is light: it imports no backend, no torch. ``edgevl.load(bundle)`` is the
on-device entry point; the compile side lives in ``edgevl.exporters`` (needs ``edgevl[export]``).
"""

__version__ = "0.8.1"


def load(bundle, backend=None, **kwargs):
    """Load a bundle for inference; see :func:`edgevl.api.load`."""
    from edgevl.api import load as _load

    return _load(bundle, backend=backend, **kwargs)


__all__ = ["__version__", "load"]
