"""The TensorRT target: each ONNX part of a bundle -> a serialized engine for this GPU.

Per part: parse the ONNX (converted to FP16 first on TensorRT 11 for --fp16), add the
optimization profiles computed from the manifest (trt_profiles), set the precision the way
this TensorRT version wants it (trt_plan), cap the workspace, share a persistent timing cache
between builds, optionally place the vision encoder on a Jetson DLA core (static shape, GPU
fallback; the build reports how many layers the DLA takes), build, and write ``tensorrt/<part>.engine`` + its metadata sidecar (trt_metadata) into the
bundle. An engine whose sidecar already matches this TensorRT, this GPU, the part's ONNX and
the build settings is reused instead of rebuilt (``rebuild=True`` forces).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgevl.errors import BackendUnavailable, ConfigError
from edgevl.exporters.compile.trt_plan import BuildPlan, part_precision, plan_build, static_profiles
from edgevl.exporters.compile.trt_profiles import AxisRange, Profile, ProfileOptions, compute_profiles

ARTIFACT_DIR = "tensorrt"
DEFAULTS = {"precision": "auto", "parts": None, "max_batch": 8, "opt_batch": 1, "max_seq": None, "opt_seq": None,
            "max_capacity": None, "opt_capacity": None, "dims": (), "decoder_profiles": "split",
            "workspace_mb": 2048, "timing_cache": None, "opt_level": 3, "dla_core": None,
            "dla_parts": ("vision",), "int8_float": "fp16", "via": None, "rebuild": False, "device_index": 0}
INSTALL_HINT = ("install it with `pip install edgevl[tensorrt]` (on Jetson TensorRT comes with JetPack: "
                "`sudo apt install python3-libnvinfer`), and compile on the device that will run the engines: "
                "TensorRT engines are not portable")


# -- CLI ---------------------------------------------------------------------------------------
def add_arguments(g) -> None:
    g.add_argument("--max-batch", type=int, default=8, help="largest batch of every part (default 8)")
    g.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default 1)")
    g.add_argument("--max-seq", type=int, default=None, help="longest prompt in tokens (default: context, <= 1024)")
    g.add_argument("--opt-seq", type=int, default=None, help="prompt length to tune prefill for (default: image tokens + 32)")
    g.add_argument("--max-capacity", type=int, default=None, help="largest KV cache (default: the context)")
    g.add_argument("--opt-capacity", type=int, default=None, help="KV cache size to tune for")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                   help="range of any named dynamic axis (repeatable; overrides the flags above)")
    g.add_argument("--decoder-profiles", choices=("split", "single"), default="split",
                   help="split: prefill + decode profiles (default); single: one profile, smaller engine")
    g.add_argument("--workspace-mb", type=int, default=2048, help="TensorRT workspace limit in MiB (default 2048)")
    g.add_argument("--timing-cache", default=None,
                   help="timing cache file shared by builds (default ~/.cache/edgevl/tensorrt/...; 'none' disables)")
    g.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="builder optimization level 0-5")
    g.add_argument("--dla-core", type=int, default=None, help="Jetson: run the vision part on this DLA core "
                   "(static shape at --opt-batch; GPU fallback for unsupported layers; TensorRT 10.0-10.7 or "
                   "11.4.1 on JetPack 7.2.2+)")
    g.add_argument("--dla-parts", default="vision", help="comma-separated parts placed on the DLA (default vision)")
    g.add_argument("--int8-float", choices=("fp16", "fp32"), default="fp16",
                   help="TensorRT 10 INT8: precision allowed between Q/DQ pairs (default fp16)")
    g.add_argument("--via", choices=("torch2trt",), default=None,
                   help="convert the vision encoder from PyTorch with torch2trt instead of its ONNX")
    g.add_argument("--rebuild", action="store_true", help="rebuild engines even when an up-to-date one exists")


def options_from_args(args) -> dict:
    timing = args.timing_cache
    return {"max_batch": args.max_batch, "opt_batch": args.opt_batch, "max_seq": args.max_seq,
            "opt_seq": args.opt_seq, "max_capacity": args.max_capacity, "opt_capacity": args.opt_capacity,
            "dims": tuple(args.dim), "decoder_profiles": args.decoder_profiles, "workspace_mb": args.workspace_mb,
            "timing_cache": False if timing and timing.lower() == "none" else timing, "opt_level": args.opt_level,
            "dla_core": args.dla_core, "dla_parts": tuple(p for p in args.dla_parts.split(",") if p),
            "int8_float": args.int8_float, "via": args.via, "rebuild": args.rebuild}


# -- preparation (everything that can fail before a byte is written) ----------------------------
@dataclass
class PartJob:
    part: str
    onnx: str
    onnx_sha256: str
    plan: BuildPlan
    profiles: list[Profile]
    via: str | None = None

    def build_settings(self, opts: dict) -> dict:
        return {"precision": self.plan.precision, "plan": self.plan.to_dict(),
                "profiles": [p.to_dict() for p in self.profiles], "workspace_mb": opts["workspace_mb"],
                "opt_level": opts["opt_level"], "dla_core": self.plan.dla_core, "via": self.via}


@dataclass
class Prepared:
    trt: object
    fingerprint: object
    jobs: list[PartJob]
    options: dict
    timing_cache: Path | None = None
    notes: list = field(default_factory=list)


def resolve_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown tensorrt option(s) {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}   # None: the default
    if opts["workspace_mb"] < 16:
        raise ConfigError(f"--workspace-mb {opts['workspace_mb']} is too small (at least 16)")
    if opts["via"] not in (None, "torch2trt"):
        raise ConfigError(f"--via must be torch2trt, got {opts['via']!r}")
    return opts


def profile_options(opts: dict) -> ProfileOptions:
    return ProfileOptions(max_batch=opts["max_batch"], opt_batch=opts["opt_batch"], max_seq=opts["max_seq"],
                          opt_seq=opts["opt_seq"], max_capacity=opts["max_capacity"],
                          opt_capacity=opts["opt_capacity"], decoder_profiles=opts["decoder_profiles"],
                          dims=dict(AxisRange.parse(d) for d in opts["dims"]))


def graph_has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def default_timing_cache(trt_version: str, gpu_name: str, capability: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgevl" / "tensorrt"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return root / f"timing-trt{trt_version}-{slug}-sm{capability.replace('.', '')}.cache"


def prepare(bundle, options: dict, *, trt_module=None, cuda=None) -> Prepared:
    """Check everything before a byte is written. Tests inject ``trt_module``/``cuda`` (fakes)."""
    from edgevl.runtimes.cuda_memory import open_cuda
    from edgevl.runtimes.trt_metadata import DeviceFingerprint

    opts = resolve_options(options)
    prof_opts = profile_options(opts)               # flag errors first: they need no GPU
    if trt_module is None and importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(f"--target tensorrt needs TensorRT, which is not installed here; {INSTALL_HINT}")
    if importlib.util.find_spec("onnx") is None:
        raise BackendUnavailable(f"--target tensorrt needs the onnx package to read the bundle's graphs; {INSTALL_HINT}")
    if trt_module is None:
        import tensorrt as trt_module
    trt = trt_module

    gpu_name, capability = (cuda or open_cuda(int(opts["device_index"]))).device_info()
    here = DeviceFingerprint(str(trt.__version__), gpu_name, capability)
    profiles = compute_profiles(bundle.manifest, prof_opts, opts["parts"])
    # DLA is decided by what the builder reports (10.8+, 11.0-11.3 and 11.5+ report 0 cores)
    dla_cores = (int(trt.Builder(trt.Logger(trt.Logger.WARNING)).num_DLA_cores)
                 if opts["dla_core"] is not None else None)
    jobs, any_qdq = [], False
    for part, part_profiles in profiles.items():
        spec = bundle.parts[part]
        has_qdq = graph_has_qdq(bundle.path / spec["onnx"])
        any_qdq |= has_qdq
        precision = part_precision(opts["precision"], has_qdq, part)
        dla = opts["dla_core"] if part in opts["dla_parts"] else None
        plan = plan_build(here.tensorrt_version, precision, has_qdq=has_qdq, dla_core=dla,
                          int8_float=opts["int8_float"], dla_cores=dla_cores)
        if plan.dla_core is not None:
            part_profiles = static_profiles(part_profiles)
        sha = bundle.manifest["files"][spec["onnx"]]["sha256"]
        via = opts["via"] if part == "vision" else None
        jobs.append(PartJob(part, spec["onnx"], sha, plan, part_profiles, via))
    if opts["precision"] == "int8" and not any_qdq:
        raise ConfigError("--int8 was asked for but no part of this bundle has Q/DQ nodes; TensorRT 11 has no "
                          "implicit calibration (and edgevl does not use TensorRT 10's): quantize the bundle first")
    if opts["via"]:
        from edgevl.exporters.compile.torch2trt_vision import check_via_torch2trt

        check_via_torch2trt(bundle, next((j for j in jobs if j.part == "vision"), None), here.tensorrt_version)
    timing = opts["timing_cache"]
    if timing is False:
        timing = None
    else:
        timing = Path(timing) if timing else default_timing_cache(here.tensorrt_version, gpu_name, capability)
    return Prepared(trt, here, jobs, opts, timing)


# -- building ----------------------------------------------------------------------------------
def compile_parts(bundle, writer, prepared: Prepared, log=print) -> None:
    from edgevl.runtimes.trt_metadata import make_metadata, mismatches, read_metadata, sidecar_path, write_engine

    summary = {}
    for job in prepared.jobs:
        rel = f"{ARTIFACT_DIR}/{job.part}.engine"
        settings = job.build_settings(prepared.options)
        old = bundle.path / rel
        reused = False
        if not prepared.options["rebuild"] and old.is_file() and sidecar_path(old).is_file():
            meta = read_metadata(old)
            if not mismatches(meta, prepared.fingerprint, job.onnx_sha256) and meta.get("build") == settings:
                for src in (old, sidecar_path(old)):
                    shutil.copy2(src, writer.file(f"{ARTIFACT_DIR}/{src.name}"))
                reused, seconds = True, 0.0
                log(f"  {job.part:<8} engine is up to date ({prepared.fingerprint.describe()}): reused")
        if not reused:
            t0 = time.perf_counter()
            if job.via == "torch2trt":
                from edgevl.exporters.compile.torch2trt_vision import build_vision_engine

                built = BuiltEngine(build_vision_engine(bundle, job, prepared, log))
            else:
                built = build_engine(prepared.trt, bundle.path / job.onnx, job.plan, job.profiles,
                                     workspace_mb=prepared.options["workspace_mb"],
                                     opt_level=prepared.options["opt_level"],
                                     timing_cache=prepared.timing_cache, log=log)
            seconds = round(time.perf_counter() - t0, 2)
            spec = bundle.parts[job.part]
            meta = make_metadata(part=job.part, fingerprint=prepared.fingerprint, onnx_file=job.onnx,
                                 onnx_sha256=job.onnx_sha256, engine_sha256="", build=settings,
                                 io={"inputs": spec["inputs"], "outputs": spec["outputs"]},
                                 created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            if built.dla is not None:
                meta["dla"] = built.dla
            meta = write_engine(writer.file(rel), built.serialized, meta)
            log(f"  {job.part:<8} {job.plan.precision} engine built in {seconds:.1f} s "
                f"({len(job.profiles)} profile(s){', DLA core %d' % job.plan.dla_core if job.plan.dla_core is not None else ''})")
            for note in job.plan.notes:
                log(f"           note: {note}")
        writer.manifest["parts"][job.part].setdefault("artifacts", {})["tensorrt"] = rel
        summary[job.part] = {"precision": job.plan.precision, "build_seconds": seconds, "reused": reused}
    writer.manifest["target"] = "tensorrt"
    writer.manifest.setdefault("provenance", {})["tensorrt"] = {
        "tensorrt_version": prepared.fingerprint.tensorrt_version, "gpu": prepared.fingerprint.gpu_name,
        "compute_capability": prepared.fingerprint.compute_capability, "parts": summary}


@dataclass
class BuiltEngine:
    serialized: object              # TensorRT's IHostMemory (or bytes)
    dla: dict | None = None         # where the layers of a DLA part went (see _dla_report)


def _logger(trt, log):
    """A TensorRT ILogger that prints warnings and errors like ``trt.Logger(WARNING)`` and keeps
    the INFO messages, where TensorRT lists the layers it placed on the DLA and the GPU."""
    severity = trt.ILogger.Severity if hasattr(trt.ILogger, "Severity") else trt.Logger

    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.info: list[str] = []
            self.errors: list[str] = []

        def log(self, level, msg):
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(str(msg))
            if level in (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)
            elif level == severity.INFO:
                self.info.append(str(msg))

    return _Capture()


def build_engine(trt, onnx_path: Path, plan: BuildPlan, profiles: list[Profile], *, workspace_mb: int = 2048,
                 opt_level: int = 3, timing_cache: Path | None = None, log=print) -> BuiltEngine:
    """Parse + configure + build one engine; returns TensorRT's serialized plan (IHostMemory)
    and, for a DLA part, how many layers the DLA took."""
    from edgevl.errors import CompileError

    logger = _logger(trt, log)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)   # 11.x: deprecated, always on
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)    # owns the parsed weights: keep it alive until the build ends
    with tempfile.TemporaryDirectory(prefix="edgevl-trt-") as tmp:
        model_path = onnx_path
        if plan.convert_fp16:
            from edgevl.exporters.compile.fp16 import convert_file

            model_path = Path(tmp) / onnx_path.name
            report = convert_file(onnx_path, model_path)
            log(f"           FP16 graph for strong typing: {report['fp16_nodes']} nodes FP16, "
                f"{report['fp32_nodes']} FP32, {report['casts']} casts")
        if not parser.parse_from_file(str(model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser error given"
            raise CompileError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {errors}")
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        names = {t.name for t in inputs}
        for prof in profiles:
            missing = [t.name for t in inputs if any(d < 0 for d in t.shape) and t.name not in prof.shapes]
            if missing:
                raise CompileError(f"{onnx_path.name}: dynamic input(s) {missing} have no range in profile "
                                   f"{prof.name!r}; the manifest does not describe this graph (re-export the bundle)")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        config.builder_optimization_level = int(opt_level)
        for flag in plan.builder_flags:
            if not hasattr(trt.BuilderFlag, flag):
                raise CompileError(f"TensorRT {trt.__version__} has no builder flag {flag} (the plan was made for "
                                   f"TensorRT {plan.tensorrt_version}); recompile on this device")
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in plan.cleared_flags:
            if hasattr(trt.BuilderFlag, flag):
                config.clear_flag(getattr(trt.BuilderFlag, flag))
        if plan.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(plan.dla_core)
        for prof in profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.shapes.items():
                if name in names:       # the parser drops inputs the graph never reads
                    try:
                        p.set_shape(name, lo, opt, hi)
                    except RuntimeError as e:     # the binding raises for inconsistent shapes
                        raise CompileError(f"{onnx_path.name}: TensorRT rejected profile {prof.name!r} for input "
                                           f"{name!r} ({lo}..{opt}..{hi}): {e}") from e
            if config.add_optimization_profile(p) < 0:
                raise CompileError(f"{onnx_path.name}: TensorRT rejected optimization profile {prof.name!r} "
                                   f"{prof.to_dict()['shapes']}; check the --dim/--max-* ranges")
        dla = _dla_capability(network, config, plan.dla_core) if plan.dla_core is not None else None
        cache = _attach_timing_cache(config, timing_cache, log)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            why = "; ".join(logger.errors[-3:]) or "see the TensorRT log above"
            raise CompileError(f"TensorRT {trt.__version__} failed to build {onnx_path.name} ({why}); try "
                               "--workspace-mb larger, --decoder-profiles single, or smaller --max-* ranges")
    if cache is not None:
        _save_timing_cache(config.get_timing_cache(), timing_cache, log)
    if dla is not None:
        dla.update(_dla_placement(logger.info))
        log(_describe_dla(dla))
    return BuiltEngine(serialized, dla)


def _dla_capability(network, config, core: int) -> dict:
    """Before the build: which network layers TensorRT says can run on the DLA
    (``IBuilderConfig.can_run_on_DLA``, present in 10.x and 11.x)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    gpu = [layer.name for layer in layers if not config.can_run_on_DLA(layer)]
    return {"core": int(core), "layers": len(layers), "dla_capable": len(layers) - len(gpu), "gpu_layers": gpu[:20]}


_DLA_SECTION = re.compile(r"layers running on (dla|gpu)", re.IGNORECASE)


def _dla_placement(info: list[str]) -> dict:
    """After the build: the placement TensorRT logs at INFO level, a "Layers Running on DLA"
    header with one "[DlaLayer] ..." message per DLA subgraph, then "... on GPU" with one
    "[GpuLayer] ..." per GPU layer (the 8.4+ wording). The wording is TensorRT's, not an API:
    without such a header the counts are None and the build says the log did not list them."""
    counts, seen = {"dla": 0, "gpu": 0}, False
    for msg in info:
        text = str(msg).strip()
        if _DLA_SECTION.search(text):
            seen = True
        elif text.startswith("[DlaLayer]"):
            counts["dla"] += 1
        elif text.startswith("[GpuLayer]"):
            counts["gpu"] += 1
    if not seen:
        return {"placed_on_dla": None, "placed_on_gpu": None}
    return {"placed_on_dla": counts["dla"], "placed_on_gpu": counts["gpu"]}


def _describe_dla(dla: dict) -> str:
    text = (f"           DLA core {dla['core']}: {dla['dla_capable']} of {dla['layers']} network layers can run on "
            f"the DLA")
    if dla.get("placed_on_dla") is not None:
        text += (f"; TensorRT placed {dla['placed_on_dla']} layer(s) on the DLA and {dla['placed_on_gpu']} on the "
                 "GPU")
    else:
        text += "; TensorRT's log did not list the placement"
    if dla["dla_capable"] == 0 or dla.get("placed_on_dla") == 0:
        text += " -- nothing runs on the DLA: this part runs entirely on the GPU (GPU fallback)"
    elif dla["gpu_layers"]:
        text += f"; on the GPU: {', '.join(dla['gpu_layers'][:5])}{' ...' if len(dla['gpu_layers']) > 5 else ''}"
    return text


def _attach_timing_cache(config, path: Path | None, log):
    """Load the shared cache (``create_timing_cache``: b"" makes a new one) and attach it;
    ``set_timing_cache`` returns False for a cache from another device, so start afresh."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:
        log(f"           timing cache {path} is unreadable (another TensorRT?): starting a new one")
        cache = config.create_timing_cache(b"")
    if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"           timing cache {path} was made on another device: starting a new one")
        cache = config.create_timing_cache(b"")
        if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
            cache = None
    return cache


def _save_timing_cache(cache, path: Path, log) -> None:
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(bytes(memoryview(cache.serialize())))
    os.replace(tmp, path)          # atomic: concurrent builds never read half a cache
