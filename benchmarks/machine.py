"""What a measurement ran on, and how fast this machine can stream memory.

Every benchmark result carries ``machine_info()``: a number without its CPU (and its SIMD
flags: AVX-512 VNNI, BF16 and AMX decide INT8/BF16 speed), cores, memory and library versions
cannot be compared with anything. ``copy_bandwidth()`` measures what the decode ceiling is
computed from: single-token decode reads every weight once per token, so
tokens/s <= bandwidth / bytes of weights read per token.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from pathlib import Path

# Flags that change which kernels the backends pick; recorded with every measurement.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile",
                     "asimd", "asimddp", "sve", "i8mm", "bf16")
LIBRARIES = ("numpy", "onnxruntime", "openvino", "torch", "transformers", "onnx", "nncf", "tokenizers")


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Hardware", "CPU part") and key not in info:
            info[key] = value
        elif key in ("flags", "Features") and "flags" not in info:
            info["flags"] = value.split()
        elif key == "model" and "model" not in info:
            info["model"] = value
    return info


def _l3_cache_bytes() -> int | None:
    """Size of the last-level cache (sysfs), for telling when weights never leave the cache."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1:].upper(), 1)
        value = int(size.rstrip("KMGkmg")) * mult
        if best is None or level > best[0]:
            best = (level, value)
    return best[1] if best else None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def library_versions(names=LIBRARIES) -> dict:
    """Versions of the libraries that are installed (missing ones are left out, not imported
    when already loaded elsewhere is enough: importing torch here would cost ~1 s and 300 MB)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        from edgevl import __version__
        versions["edgevl"] = __version__
    except ImportError:
        pass
    return versions


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which is what a load average compares with."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_now() -> float | None:
    """The 1-minute load average (runnable threads, all processes), None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (/proc/stat: everything but idle and iowait;
    steal included, since a hypervisor taking the core is competition too), None off Linux."""
    try:
        fields = [float(x) for x in open("/proc/stat").readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


_clock = time.perf_counter


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OthersCpu:
    """How many cores *other* processes kept busy while this process measured (in-process timing
    only). Unlike the load average, it does not count this process's own work, so a run that has
    just built bundles on every core is not taken for a busy machine.

        with OthersCpu() as others: ...measure...
        others.cores   # average cores used by other processes, or None where unknown"""

    def __enter__(self) -> "OthersCpu":
        self.cores = None
        self._start = (_clock(), _busy_cpu_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        t0, busy0, own0 = self._start
        busy1, wall = _busy_cpu_seconds(), _clock() - t0
        if busy0 is not None and busy1 is not None and wall > 0:
            self.cores = max(0.0, ((busy1 - busy0) - (_own_cpu_seconds() - own0)) / wall)


def machine_info() -> dict:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", []))
    return {
        "cpu": cpu.get("model name") or cpu.get("Hardware") or platform.processor() or "unknown",
        "cpu_model_number": cpu.get("model"),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
        "has": {"avx512": "avx512f" in flags, "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
                "bf16": "avx512_bf16" in flags or "amx_bf16" in flags, "amx": "amx_tile" in flags},
        "l3_cache_mb": round(_l3_cache_bytes() / 2 ** 20, 1) if _l3_cache_bytes() else None,
        "memory_gb": round(_memory_bytes() / 2 ** 30, 1) if _memory_bytes() else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": library_versions(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def copy_bandwidth(megabytes: int = 256, threads: int | None = None, repeats: int = 5) -> dict:
    """Measured memory copy bandwidth in GB/s (bytes read + bytes written per second).

    numpy releases the GIL while copying large arrays, so ``threads`` workers each copying their
    own slice measure what several cores can stream together (decode runs on all of them). The
    array is far larger than any cache, so this is DRAM bandwidth. Best of ``repeats``: the
    question is what the memory can do, not how busy the machine was.
    """
    import numpy as np

    threads = threads or usable_cores()
    n = megabytes * 2 ** 20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(threads)]

    def copy_slice(s):
        np.copyto(dst[s], src[s])

    copy_slice(slice(0, n))                  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=copy_slice, args=(s,)) for s in slices]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    moved = 2 * src.nbytes                   # each byte is read once and written once

    def read_slice(s):
        src[s].sum()

    best_read = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=read_slice, args=(s,)) for s in slices]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best_read = min(best_read, time.perf_counter() - t)
    return {"copy_gb_s": round(moved / best / 1e9, 2), "read_gb_s": round(src.nbytes / best_read / 1e9, 2),
            "megabytes": megabytes, "threads": threads,
            "method": f"numpy.copyto (read+write bytes/s) and ndarray.sum (bytes read/s), best of {repeats}"}


def decode_ceiling(bandwidth_gb_s: float, weight_bytes_per_token: float) -> float | None:
    """Upper bound on single-stream decode tokens/s if every weight is read once per token."""
    if not bandwidth_gb_s or not weight_bytes_per_token:
        return None
    return bandwidth_gb_s * 1e9 / weight_bytes_per_token


if __name__ == "__main__":  # quick look: python -m edgevl.benchmarks.machine
    import json

    print(json.dumps({**machine_info(), "bandwidth": copy_bandwidth()}, indent=2))
    sys.exit(0)
