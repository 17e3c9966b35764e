"""The build side of the fake TensorRT (see trt_fakes.py for the sources they follow):
NetworkDefinition, OnnxParser, OptimizationProfile, timing cache, BuilderConfig and Builder,
plus torch2trt's shape check. FakeTRT.Builder / FakeTRT.OnnxParser hand these out."""

from __future__ import annotations

import hashlib
import json

from trt_fakes import PLAN_MAGIC, PRECISION_FLAGS, DeviceType, FakeHostMemory, ILogger, _FROM_ONNX, _Member


# -- build side ---------------------------------------------------------------------------------
class FakeTensor:
    """``ITensor``: ``name``, ``shape`` (-1 for dynamic axes), ``dtype``."""

    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class FakeLayer:
    """``ILayer``: ``name`` and ``type`` (here the ONNX op it came from)."""

    def __init__(self, name, op):
        self.name, self.type = name, op


class FakeNetwork:
    """``INetworkDefinition`` as the parser fills it: inputs, outputs, layers."""

    def __init__(self, trt: "FakeTRT", flags: int):
        self.trt, self.flags = trt, flags
        strong = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.strongly_typed = bool(flags & strong) or trt.major >= 11     # 11.x: always strongly typed
        self.inputs: list[FakeTensor] = []
        self.outputs: list[FakeTensor] = []
        self.layers: list[FakeLayer] = []
        self.onnx_bytes = b""

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]

    def get_layer(self, index):
        return self.layers[index]

    def get_flag(self, flag):
        return bool(self.flags & (1 << int(flag))) or (self.trt.major >= 11 and flag.name == "STRONGLY_TYPED")


class FakeParserError:
    """``ParserError`` (pyOnnx.cpp): code(), desc(), node(), node_name(), node_operator(), str()."""

    def __init__(self, desc, node=-1, node_name="", op=""):
        self._desc, self._node, self._name, self._op = desc, node, node_name, op

    def code(self):
        return "UNSUPPORTED_NODE" if self._op else "MODEL_DESERIALIZE_FAILED"

    def desc(self):
        return self._desc

    def node(self):
        return self._node

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op

    def __str__(self):
        where = f"In node {self._node} with name: {self._name} and operator: {self._op} " if self._op else ""
        return f"{where}ERROR: {self._desc}"


class FakeOnnxParser:
    """``tensorrt.OnnxParser(network, logger)``: ``parse_from_file(model)`` -> bool, ``num_errors``,
    ``get_error(index)`` -> ParserError. Reads the real ONNX file (onnx); ops listed in
    ``FakeTRT.unsupported_ops`` fail like an op without an importer."""

    def __init__(self, network: FakeNetwork, logger):
        self.network, self.logger = network, logger
        self.errors: list[FakeParserError] = []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]

    def parse_from_file(self, model):
        import onnx

        try:
            proto = onnx.load(str(model))
        except Exception as e:        # a missing or corrupt file: the parser reports, it does not raise
            self.errors.append(FakeParserError(f"Failed to parse ONNX model from file: {model} ({e})"))
            return False
        net, unsupported = self.network, self.network.trt.unsupported_ops
        for i, node in enumerate(proto.graph.node):
            if node.op_type in unsupported:
                self.errors.append(FakeParserError(f"No importer registered for op: {node.op_type}", i,
                                                   node.name, node.op_type))
        if self.errors:
            return False
        init = {t.name for t in proto.graph.initializer}

        def tensor(v):
            tt = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
            return FakeTensor(v.name, shape, _FROM_ONNX[tt.elem_type])
        net.inputs = [tensor(v) for v in proto.graph.input if v.name not in init]
        net.outputs = [tensor(v) for v in proto.graph.output]
        net.layers = [FakeLayer(n.name or f"{n.op_type}_{i}", n.op_type) for i, n in enumerate(proto.graph.node)]
        net.onnx_bytes = proto.SerializeToString()
        return True


class FakeOptimizationProfile:
    """``IOptimizationProfile``: ``set_shape(input, min, opt, max)`` raises RuntimeError("Shape
    provided for min|opt|max is inconsistent with other shapes.") when a rank disagrees
    (opt_profile_set_shape); ``get_shape``; ``bool(profile)`` is isValid's partial check
    (max >= opt >= min)."""

    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):
        triple = [tuple(int(d) for d in s) for s in (min, opt, max)]
        for which, shape in zip(("min", "opt", "max"), triple):
            if len(shape) != len(triple[0]) or any(d < 0 for d in shape):
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
        self.shapes[input] = tuple(triple)

    def get_shape(self, input):
        return list(self.shapes.get(input, ()))

    def __bool__(self):
        return all(all(a <= b <= c for a, b, c in zip(lo, opt, hi)) for lo, opt, hi in self.shapes.values())


class FakeTimingCache:
    """``ITimingCache``: ``serialize()`` -> IHostMemory, ``combine``, ``reset``. Its data names the
    device it was timed on, which ``set_timing_cache`` checks (pyCoreDoc.h set_timing_cache)."""

    def __init__(self, version, device, entries=None):
        self.version, self.device, self.entries = version, device, dict(entries or {})

    def serialize(self):
        body = {"magic": "FAKE-TIMING-CACHE", "version": self.version, "device": self.device, "entries": self.entries}
        return FakeHostMemory(json.dumps(body, sort_keys=True).encode())

    def combine(self, input_cache, ignore_mismatch):
        if input_cache.device != self.device and not ignore_mismatch:
            return False
        self.entries.update(input_cache.entries)
        return True

    def reset(self):
        self.entries.clear()
        return True


class FakeBuilderConfig:
    """``IBuilderConfig``: memory pools, flags (TF32 set by default: "Enabled by default"),
    ``builder_optimization_level``, ``default_device_type``, ``DLA_core``,
    ``add_optimization_profile`` (-> index, or -1 when ``bool(profile)`` is False),
    ``can_run_on_DLA``, and the timing cache: ``create_timing_cache(b"")`` makes a new one;
    unreadable data gives None here (the binding returns the C++ pointer; what it does with
    garbage is not documented); ``set_timing_cache`` -> bool; ``get_timing_cache`` -> cache or
    None."""

    def __init__(self, trt: "FakeTRT"):
        self.trt = trt
        self.flags = {"TF32"}
        self.pools: dict[str, int] = {}
        self.builder_optimization_level = 3
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.profiles: list[FakeOptimizationProfile] = []
        self.timing_cache: FakeTimingCache | None = None

    def _flag_name(self, flag):
        if not isinstance(flag, _Member) or flag.enum != "BuilderFlag":
            raise TypeError(f"set_flag(): incompatible function arguments: {flag!r} is not a BuilderFlag")
        return flag.name

    def set_flag(self, flag):
        self.flags.add(self._flag_name(flag))

    def clear_flag(self, flag):
        self.flags.discard(self._flag_name(flag))

    def get_flag(self, flag):
        return self._flag_name(flag) in self.flags

    def set_memory_pool_limit(self, pool, pool_size):
        self.pools[pool.name] = int(pool_size)

    def get_memory_pool_limit(self, pool):
        return self.pools.get(pool.name, 0)

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    def add_optimization_profile(self, profile):
        if not profile:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def can_run_on_DLA(self, layer):
        return layer.type in self.trt.dla_ops

    def create_timing_cache(self, serialized_timing_cache):
        data = bytes(memoryview(serialized_timing_cache))
        if not data:
            return FakeTimingCache(self.trt.__version__, self.trt.gpu)
        try:
            body = json.loads(data.decode())
            assert body["magic"] == "FAKE-TIMING-CACHE" and body["version"] == self.trt.__version__
        except Exception:
            return None
        return FakeTimingCache(body["version"], body["device"], body["entries"])

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.device != self.trt.gpu and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


class FakeBuilder:
    """``tensorrt.Builder(logger)``: ``num_DLA_cores``, ``create_network(flags=0)``,
    ``create_builder_config()``, ``create_optimization_profile()`` and
    ``build_serialized_network(network, config)`` -> IHostMemory, or None with the reason logged
    as an ERROR (the C++ nullptr). The checks are TensorRT's documented rules: dynamic inputs
    need a profile covering them (IOptimizationProfile docs), a strongly typed network takes no
    precision flags, DLA needs a core that exists, FP16/INT8 (10.x) and static shapes ("DLA Supported
    Layers and Restrictions"); what cannot run on the DLA falls back to the GPU with GPU_FALLBACK,
    else the build fails. The placement is logged at INFO in the 8.4+ wording ("Layers Running
    on DLA", "[DlaLayer] ...", "[GpuLayer] ..."), taken from users' logs, not from the source."""

    def __init__(self, trt: "FakeTRT", logger):
        if not isinstance(logger, ILogger):
            raise TypeError("Builder(): incompatible constructor arguments: logger must be a tensorrt.ILogger")
        self.trt, self.logger = trt, logger

    @property
    def num_DLA_cores(self):
        return self.trt.dla_cores

    def create_network(self, flags=0):
        known = sum(1 << int(m) for m in self.trt.NetworkDefinitionCreationFlag.__members__.values())
        if flags & ~known:
            self.logger.log(ILogger.ERROR, f"createNetworkV2: invalid flags {flags}")
            return None
        return FakeNetwork(self.trt, flags)

    def create_builder_config(self):
        return FakeBuilderConfig(self.trt)

    def create_optimization_profile(self):
        return FakeOptimizationProfile()

    def _fail(self, msg):
        self.logger.log(ILogger.ERROR, msg)
        return None

    def build_serialized_network(self, network, config):
        trt = self.trt
        dynamic = [t.name for t in network.inputs if -1 in t.shape]
        if dynamic and not config.profiles:
            return self._fail("Network has dynamic or shape inputs, but no optimization profile has been defined.")
        for i, prof in enumerate(config.profiles):
            for t in network.inputs:
                triple = prof.shapes.get(t.name)
                if triple is None:
                    if t.name in dynamic:
                        return self._fail(f"Optimization profile {i}: dynamic input {t.name} has no dimensions set")
                    continue
                for shape in triple:
                    if len(shape) != len(t.shape) or any(d != s for d, s in zip(t.shape, shape) if d >= 0):
                        return self._fail(f"Optimization profile {i}: {t.name} dimensions {shape} do not match the "
                                          f"network input {t.shape}")
        precision = sorted(set(PRECISION_FLAGS) & config.flags)
        if network.strongly_typed and precision:
            return self._fail(f"Builder flags {precision} are not allowed for a strongly typed network")
        placement = self._place(network, config)
        if placement is None:
            return None
        if config.timing_cache is not None:
            for layer in network.layers:
                key = f"{layer.type}:{layer.name}"
                trt.timing_hits += key in config.timing_cache.entries
                config.timing_cache.entries[key] = "tactic-0"
        build = {"strongly_typed": network.strongly_typed, "flags": sorted(config.flags),
                 "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
                 "device": config.default_device_type.name, "dla_core": config.DLA_core, "pools": dict(config.pools),
                 "opt_level": config.builder_optimization_level, "placement": placement,
                 "inputs": [[t.name, t.dtype.name, list(t.shape)] for t in network.inputs],
                 "outputs": [[t.name, t.dtype.name, list(t.shape)] for t in network.outputs]}
        trt.builds.append(build)
        digest = hashlib.sha256(network.onnx_bytes).hexdigest()
        trt.onnx_models[digest] = network.onnx_bytes
        header = dict(build, version=trt.__version__, onnx=digest)
        return FakeHostMemory(PLAN_MAGIC + json.dumps(header, sort_keys=True).encode())

    def _place(self, network, config):
        if config.default_device_type is not DeviceType.DLA:
            return {"dla": 0, "gpu": len(network.layers)}
        trt, fallback = self.trt, "GPU_FALLBACK" in config.flags
        if not 0 <= config.DLA_core < trt.dla_cores:
            return self._fail(f"Cannot create DLA engine, DLA core {config.DLA_core} not available "
                              f"({trt.dla_cores} core(s))")
        static = all(lo == hi for p in config.profiles for lo, _, hi in p.shapes.values())
        typed = network.strongly_typed or {"FP16", "INT8"} & config.flags
        on_dla = []
        for layer in network.layers:
            ok = static and typed and config.can_run_on_DLA(layer)
            if not ok:
                if not fallback:
                    return self._fail(f"Layer '{layer.name}' ({layer.type}) cannot run on DLA and GPU fallback is "
                                      "disabled")
                self.logger.log(ILogger.WARNING, f"Layer '{layer.name}' ({layer.type}): Unsupported on DLA. "
                                                 "Switching this layer's device type to GPU.")
            on_dla.append(ok)
        gpu = [layer for layer, ok in zip(network.layers, on_dla) if not ok]
        # contiguous runs of DLA layers become one DLA subgraph each
        runs, current = [], []
        for layer, ok in zip(network.layers, on_dla):
            if ok:
                current.append(layer)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        self.logger.log(ILogger.INFO, "---------- Layers Running on DLA ----------")
        for run in runs:
            self.logger.log(ILogger.INFO, f"[DlaLayer] {{ForeignNode[{run[0].name}...{run[-1].name}]}}")
        self.logger.log(ILogger.INFO, "---------- Layers Running on GPU ----------")
        for layer in gpu:
            self.logger.log(ILogger.INFO, f"[GpuLayer] {layer.type.upper()}: {layer.name}")
        return {"dla": len(runs), "gpu": len(gpu), "dla_layers": sum(on_dla)}


# -- torch2trt's shape check (NVIDIA-AI-IOT/torch2trt, torch2trt/torch2trt.py, torch2trt()) ------
def torch2trt_dla_shape_check(inputs_shape: tuple, min_shapes=None, max_shapes=None, opt_shapes=None,
                              default_device_type=None, **_):
    """What ``torch2trt(...)`` does with one input before it builds anything: min/max default to
    the example's shape, the dynamic axes are where they differ (``infer_dynamic_axes``), and with
    ``default_device_type == DLA`` any dynamic axis raises
    ``ValueError('Dataset cannot have multiple shapes when using DLA')``."""
    lo = tuple(min_shapes[0]) if min_shapes is not None else tuple(inputs_shape)
    hi = tuple(max_shapes[0]) if max_shapes is not None else tuple(inputs_shape)
    dynamic = [i for i, (a, b) in enumerate(zip(lo, hi)) if a != b]
    if default_device_type is DeviceType.DLA and dynamic:
        raise ValueError("Dataset cannot have multiple shapes when using DLA")
    return dynamic
