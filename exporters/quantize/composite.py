"""`edgevl build --precision int8 | int4`: the fastest deployment, composed per part and chosen
by measurement on the machine that builds.

No single INT8 recipe is fastest everywhere (../shared/MEASURED.md item 17): on a 2-core AMD
EPYC with AVX2 only, ONNX Runtime's dynamic INT8 ran the SmolVLM-shaped vision tower 1.49x faster
than FP32 while OpenVINO's NNCF static INT8 ran *slower* than FP32; on an Intel Xeon with AMX
NNCF INT8 ran 5.1x PyTorch and dynamic beat static Q/DQ on ONNX Runtime. So each part gets
candidates, each candidate is timed here (interleaved rounds, medians) and checked against FP32
on held-out inputs, and the fastest that keeps the accuracy gate is written:

| part    | onnxruntime candidates                           | openvino candidates                        |
|---------|--------------------------------------------------|--------------------------------------------|
| vision  | fp32, dynamic INT8 (per tensor / per channel,    | fp32 IR, NNCF static INT8 IR, NNCF INT8    |
|         | int8 or uint8 weights), static Q/DQ (MinMax)     | weight compression                         |
| embed   | fp32, INT8 table (dynamic Gather quantization)   | fp32                                       |
| decoder | weight-only MatMulNBits (8 or 4 bits, integer    | NNCF INT8_SYM / INT4_SYM weights           |
|         | compute: accuracy_level 4; 4 bits in blocks of   | (int8: FP32 IR too)                        |
|         | 128 and 32), int8: FP32 and dynamic INT8 too;    |                                            |
|         | each graph also lowered to ORT's fused operators |                                            |

Decoders are ranked by what an answer costs: a prefill of the image block and a prompt plus
``answer_tokens`` (32) decode steps. A lowered ONNX Runtime decoder then tries an int8 KV cache
(exporters/lower/kv_int8.py, scales calibrated on ``kv_calib_prompts`` prompts): kept when its
logits keep the gate and a decode step costs less than with the float cache, summed over the
answer's own position and KV_LONG_POSITION (512) (``kv_cache="auto"``; "int8" / "float32" decide
without timing). The sum, not "faster at 512 and no slower at the answer's position": at short
positions the two caches differ by ~2% (0.1 ms a step of the SmolVLM shape's ~5 ms int4 step),
less than this VM's run-to-run noise, so that rule kept or dropped the int8 cache by chance, and
with it a 0.68x or 0.81x decode at 512 vs 64 (benchmarks/results/bench_e2e_v060.md).

The manifest records each part's precision and method and, under
``quantization.selection``, every candidate's timing and cosine with the machine they were
measured on, so a bundle says why it holds what it holds. The gate: every part's output cosine vs
FP32 >= ``min_cosine`` on held-out inputs, and for models with a task of their own (edgevl-tiny)
the accuracy budget in points; when the budget fails, the next-fastest vision candidate is tried
before giving up. `int8-qdq`, `int8-wo` and `int4-wo` stay available as explicit recipes.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgevl.errors import AccuracyBudgetExceeded, ConfigError, QuantizationError

OPENVINO_DIR = "openvino"
SMALL_BLOCK = 32                          # the second 4-bit block size timed on ONNX Runtime
VISION_CANDIDATES = {
    "onnxruntime": ("fp32", "dynamic-int8", "dynamic-int8-per-channel", "dynamic-uint8", "static-qdq"),
    "openvino": ("fp32", "nncf-int8", "nncf-int8-weights"),
}


KV_CACHE_CHOICES = ("auto", "int8", "float32")
KV_LONG_POSITION = 512                    # where an int8 KV cache must win (issue target: decode at 512 vs 64)


@dataclass(frozen=True)
class CompositeRecipe:
    decoder_bits: int = 8                    # 8: `int8`, 4: `int4`
    block_size: int | None = None            # weight-only blocks (default per backend, recipes.py)
    min_cosine: float = 0.99                 # every part's output vs FP32 on held-out inputs
    embed_min_cosine: float = 0.999          # an embedding table is cheap to keep in float
    int4_min_cosine: float = 0.90            # decoder logits, 4-bit weights (random-weight LLaVA shape: 0.94)
    answer_tokens: int = 32                  # decoders are ranked by prefill + this many decode steps
    rounds: int = 5                          # interleaved timing rounds per candidate
    calib_samples: int = 8                   # images for the static INT8 candidates (NNCF, Q/DQ)
    held_out_images: int = 2                 # for the parity report and the gate
    vision_candidates: tuple[str, ...] | None = None   # None: every candidate of the target
    kv_cache: str = "auto"                   # lowered ONNX Runtime decoder: "auto" (int8 when measured faster
                                             # and within the gate), "int8" (within the gate) or "float32"
    kv_calib_prompts: int = 8                # prompts whose caches calibrate the int8 KV scales

    @property
    def precision(self) -> str:
        return f"int{self.decoder_bits}"

    def validate(self, target: str) -> "CompositeRecipe":
        if self.decoder_bits not in (4, 8):
            raise ConfigError(f"decoder bits must be 4 or 8, got {self.decoder_bits}")
        known = VISION_CANDIDATES.get(target)
        if known is None:
            raise ConfigError(f"--precision {self.precision} composes recipes for {', '.join(VISION_CANDIDATES)}; "
                              f"for --target {target} use int8-qdq")
        unknown = [c for c in self.vision_candidates or () if c not in known]
        if unknown:
            raise ConfigError(f"unknown vision candidate(s) {unknown} for {target}; known: {', '.join(known)}")
        if self.kv_cache not in KV_CACHE_CHOICES:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {self.kv_cache!r}")
        if self.rounds < 1 or self.held_out_images < 1 or self.kv_calib_prompts < 1:
            raise ConfigError("rounds, held_out_images and kv_calib_prompts must be at least 1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    name: str
    path: Path                    # where the candidate file lies now
    precision: str
    method: str
    build_s: float = 0.0
    timing: dict = field(default_factory=dict)
    cosine: float | None = None
    portable: Path | None = None  # a lowered candidate's portable graph (the part's ONNX when it is chosen)

    def summary(self) -> dict:
        return {"precision": self.precision, "method": self.method, "build_s": round(self.build_s, 1),
                **self.timing, "cosine": None if self.cosine is None else round(self.cosine, 6)}


def _built(name, precision, method, make, path: Path) -> Candidate:
    t = time.perf_counter()
    make(path)
    return Candidate(name, path, precision, method, time.perf_counter() - t)


def _dynamic(src: Path, out: Path, weight_type: str, per_channel: bool = False, op_types=("MatMul",)) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgevl.exporters.quantize.qdq import clamp_ir_version, quiet

    with quiet():
        quantize_dynamic(str(src), str(out), weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                         op_types_to_quantize=list(op_types))
    clamp_ir_version(out)


def vision_candidates(src, target: str, work: Path, names, calib_feeds) -> list[Candidate]:
    """Build each named vision candidate of ``target`` into ``work``."""
    fp32 = src.part_file("vision")
    out = []
    for name in names:
        if name == "fp32" and target == "onnxruntime":
            out.append(Candidate("fp32", fp32, "fp32", "FP32 ONNX"))
        elif name.startswith("dynamic-"):
            wt = "QUInt8" if name == "dynamic-uint8" else "QInt8"
            per_channel = name.endswith("per-channel")
            method = (f"onnxruntime quantize_dynamic ({wt} weights, {'per channel' if per_channel else 'per tensor'}, "
                      "activations quantized per call)")
            out.append(_built(name, "int8", method, lambda p: _dynamic(fp32, p, wt, per_channel), work / f"{name}.onnx"))
        elif name == "static-qdq":
            method = (f"static Q/DQ (MinMax over {len(calib_feeds)} calibration images, per-channel int8 weights, "
                      "uint8 activations)")
            out.append(_built(name, "int8", method, lambda p: _static_qdq(fp32, p, calib_feeds), work / f"{name}.onnx"))
        elif name == "fp32":
            out.append(_built(name, "fp32", "FP32 IR (f32 inference hint)", lambda p: _save_ir(fp32, p),
                              work / "fp32.xml"))
        elif name == "nncf-int8":
            from edgevl.exporters.quantize.openvino_int8 import nncf_quantize_openvino

            out.append(_built(name, "int8", f"NNCF static INT8 IR (nncf.quantize, {len(calib_feeds)} calibration images)",
                              lambda p: nncf_quantize_openvino(fp32, p, calib_feeds), work / "nncf-int8.xml"))
        elif name == "nncf-int8-weights":
            out.append(_built(name, "int8", "NNCF INT8_ASYM weight compression (activations float)",
                              lambda p: _compress_ir(fp32, p), work / "nncf-int8-weights.xml"))
    return out


def _static_qdq(src: Path, out: Path, calib_feeds: list[dict]) -> None:
    from edgevl.exporters.quantize import qdq
    from edgevl.exporters.quantize.recipes import PTQRecipe

    op_types = PTQRecipe().op_types
    cache = out.with_suffix(".ranges.json")
    qdq.calibrate(src, calib_feeds, cache, "minmax", op_types)
    qdq.quantize(src, out, cache, "minmax", op_types, activations="uint8")
    cache.unlink(missing_ok=True)


def _save_ir(src: Path, out: Path) -> None:
    import openvino as ov

    ov.save_model(ov.Core().read_model(str(src)), str(out), compress_to_fp16=False)


def _compress_ir(src: Path, out: Path) -> None:
    import nncf
    import openvino as ov

    from edgevl.exporters.quantize.qdq import quiet

    with quiet():
        model = nncf.compress_weights(ov.Core().read_model(str(src)), mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(out), compress_to_fp16=False)


def _runner(backend: str, path: Path, precision: str, threads):
    from edgevl.runtimes.registry import get_runner_class

    return get_runner_class(backend)(path, precision=precision, threads=threads)


def measure(candidates: list[Candidate], backend: str, feeds: list[dict], reference: list[dict], rounds: int,
            threads=None, log=print, outputs=None) -> None:
    """Time every candidate on ``feeds[0]`` in interleaved rounds (at least ``rounds``, more for calls
    shorter than TIMED_S / rounds; after a warm-up pass) and take its worst cosine vs ``reference``
    over all feeds; fills ``timing`` and ``cosine``."""
    from edgevl.runtimes.compare import diff_outputs

    runners = {c.name: _runner(backend, c.path, c.precision, threads) for c in candidates}
    samples: dict[str, list[float]] = {c.name: [] for c in candidates}
    try:
        for c in candidates:
            r = runners[c.name]
            outs = [r.infer(f) for f in feeds]
            c.cosine = min(d.cosine for o, ref in zip(outs, reference) for d in diff_outputs(ref, o, outputs))
        fastest = min(_seconds(runners[c.name], feeds[0]) for c in candidates)
        rounds = max(rounds, min(MAX_ROUNDS, int(TIMED_S / max(fastest, 1e-6))))   # short calls: more rounds
        for _ in range(rounds):
            for c in candidates:
                time.sleep(0.05)           # ONNX Runtime's spinning threads go quiet (MEASURED.md 2)
                t = time.perf_counter()
                runners[c.name].infer(feeds[0])
                samples[c.name].append((time.perf_counter() - t) * 1e3)
    finally:
        for r in runners.values():
            r.close()
    for c in candidates:
        s = np.asarray(samples[c.name])
        c.timing = {"median_ms": round(float(np.median(s)), 2), "p10_ms": round(float(np.percentile(s, 10)), 2),
                    "p90_ms": round(float(np.percentile(s, 90)), 2), "runs": len(s)}
        log(f"    {c.name:<26} {c.timing['median_ms']:9.1f} ms (p10 {c.timing['p10_ms']:.1f}, p90 "
            f"{c.timing['p90_ms']:.1f}), cosine {c.cosine:.5f}")


TIMED_S, MAX_ROUNDS = 0.3, 60        # per candidate: at least ~0.3 s of timed calls, at most 60 rounds


def _seconds(runner, feeds: dict) -> float:
    t = time.perf_counter()
    runner.infer(feeds)
    return time.perf_counter() - t


def ranked(candidates: list[Candidate], min_cosine: float) -> list[Candidate]:
    """Candidates that keep the gate, fastest first."""
    return sorted((c for c in candidates if c.cosine is not None and c.cosine >= min_cosine),
                  key=lambda c: c.timing["median_ms"])


def selection_record(part: str, backend: str, candidates: list[Candidate], chosen: Candidate, gate: float) -> dict:
    from edgevl.benchmarks.machine import machine_info

    m = machine_info()
    return {"part": part, "backend": backend, "chosen": chosen.name, "min_cosine": gate,
            "measured_on": {"cpu": m.get("cpu"), "flags": m.get("flags"), "cores": m.get("usable_cores"),
                            "load_average": [round(x, 2) for x in os.getloadavg()]},
            "candidates": {c.name: c.summary() for c in candidates}}


def _decoder(src, writer, target: str, work: Path, recipe: CompositeRecipe, held: list[dict], threads, log,
             calib="world") -> dict:
    """The decoder: weight-only at ``recipe.decoder_bits`` (MatMulNBits for ONNX Runtime, which
    OpenVINO reads too; an NNCF-compressed IR for OpenVINO), timed on held-out decode steps against
    the FP32 decoder for ``int8`` (on a small decoder whose weights sit in cache, dequantizing can
    cost more than the bandwidth it saves); ``int4`` always keeps its 4-bit weights."""
    import shutil

    from edgevl.exporters.quantize.recipes import WeightOnlyRecipe, default_block_size, weight_only_backends
    from edgevl.exporters.quantize.weight_only import matmul_nbits, nncf_compress_openvino

    backends = weight_only_backends(target)
    wo = WeightOnlyRecipe(bits=recipe.decoder_bits, block_size=recipe.block_size or default_block_size(backends),
                          backends=backends).validate()
    fp32_onnx = src.part_file("decoder")
    t = time.perf_counter()
    ort_info = matmul_nbits(fp32_onnx, work / "decoder-wo.onnx", wo)
    method = f"weight-only INT{wo.bits} MatMulNBits (blocks of {wo.block_size}, accuracy_level {wo.accuracy_level})"
    info = {"onnxruntime": ort_info}
    cands = [Candidate("weight-only", work / "decoder-wo.onnx", f"int{wo.bits}", method, time.perf_counter() - t)]
    recipes = {"weight-only": wo}
    if target == "onnxruntime" and wo.bits == 4 and recipe.block_size is None and wo.block_size != SMALL_BLOCK:
        # the block size is measured too: with ORT 1.32 on an AVX2 EPYC, 4-bit blocks of 32 ran a
        # 576x1536 product 1.33x faster than blocks of 128 at batch 1; edgevl 0.1.0's run on an
        # older ORT had found the opposite (recipes.default_block_size)
        small = recipes["weight-only-b32"] = WeightOnlyRecipe(bits=4, block_size=SMALL_BLOCK, backends=backends)
        t = time.perf_counter()
        info["onnxruntime-b32"] = matmul_nbits(fp32_onnx, work / "decoder-wo-b32.onnx", small)
        cands.append(Candidate("weight-only-b32", work / "decoder-wo-b32.onnx", "int4",
                               f"weight-only INT4 MatMulNBits (blocks of {SMALL_BLOCK}, accuracy_level "
                               f"{small.accuracy_level})", time.perf_counter() - t))
    if target == "openvino":
        t = time.perf_counter()
        info["openvino"] = nncf_compress_openvino(fp32_onnx, work / "decoder-wo.xml", wo)
        method = f"weight-only NNCF {info['openvino']['mode'].upper()} IR" + (
            f" (groups of {wo.block_size})" if wo.bits == 4 else "")
        cands = [Candidate("weight-only", work / "decoder-wo.xml", f"int{wo.bits}", method, time.perf_counter() - t)]
    if wo.bits == 8:
        fp32 = Candidate("fp32", fp32_onnx, "fp32", "FP32")
        if target == "openvino":
            fp32 = _built("fp32", "fp32", "FP32 IR (f32 inference hint)", lambda p: _save_ir(fp32_onnx, p),
                          work / "decoder-fp32.xml")
        cands.append(fp32)
    # ORT's fused operators (exporters/lower) read Llama-shaped decoders (Qwen2's q/k/v bias included) with
    # heads of a multiple of 16: any other decoder (Gemma norms, OPT...) keeps its portable candidates
    from edgevl.exporters.lower.onnxruntime_decoder import lowering_refusal

    lowerable = target == "onnxruntime" and lowering_refusal(src.manifest["decoder"]) is None
    # the one-line peer's recipe is a candidate like any other; for int4 it can only serve as the (lowered)
    # prefill graph, so it is built there only when it can be lowered
    if target == "onnxruntime" and (wo.bits == 8 or lowerable):
        cands.append(_built("dynamic-int8", "int8", "onnxruntime quantize_dynamic (QInt8 weights, per channel, "
                            "activations quantized per call)",
                            lambda p: _dynamic(fp32_onnx, p, "QInt8", per_channel=True), work / "decoder-dyn.onnx"))
    if lowerable:                        # the same weights lowered
        from edgevl.exporters.lower.onnxruntime_decoder import lower_onnx

        lowered = info["lowered"] = {}
        for c in list(cands):
            t = time.perf_counter()
            path = work / f"decoder-{c.name}-lowered.onnx"
            lowered[c.name] = lower_onnx(c.path, src.manifest["decoder"], path)
            cands.append(Candidate(f"{c.name}-lowered", path, c.precision, f"{c.method}, lowered: GroupQueryAttention"
                                   " over the KV cache in place, SkipSimplifiedLayerNormalization",
                                   time.perf_counter() - t + c.build_s, portable=c.path))
    steps = [f for f in held if f["inputs_embeds"].shape[1] == 1] or held
    steps = sorted(steps, key=lambda f: -int(f["past_len"].max()))[:4]       # the longest caches first
    prefill = max(held, key=lambda f: f["inputs_embeds"].shape[1])           # the image block + a prompt
    log(f"  decoder candidates on {target}: an answer = prefill of {prefill['inputs_embeds'].shape[1]} tokens + "
        f"{recipe.answer_tokens} decode steps (at position {int(steps[0]['past_len'].max())})")
    answer_cost(cands, target, steps, prefill, recipe, src, threads, log)
    gate = recipe.min_cosine if wo.bits == 8 else recipe.int4_min_cosine
    prefill_only = {"dynamic-int8", "dynamic-int8-lowered"} if wo.bits == 4 else set()
    order = ranked([c for c in cands if c.name not in prefill_only], gate)
    if not order:
        raise QuantizationError(f"no decoder candidate kept logits cosine >= {gate} vs FP32 ("
                                + ", ".join(f"{c.name} {c.cosine:.4f}" for c in cands) + "); try int8 or int4-wo")
    chosen = order[0]
    prefill_graph = _int8_prefill(cands, chosen, recipe, log) if prefill_only else None
    if prefill_graph is not None:
        prefill_graph = _shared_head(prefill_graph, chosen, target, prefill, recipe, src, threads, work, info, log)
        cands.append(prefill_graph[1])
    kv = None
    if chosen.name.endswith("-lowered") and recipe.kv_cache != "float32":
        kv = _int8_kv(src, chosen, prefill_graph[0] if prefill_graph else None, held, recipe, gate, calib, work,
                      threads, log)
        info["kv_cache"] = kv
    spec = writer.manifest["parts"]["decoder"]
    if target == "openvino":
        ir = f"{OPENVINO_DIR}/decoder.xml"
        shutil.copyfile(chosen.path, writer.file(ir))
        shutil.copyfile(chosen.path.with_suffix(".bin"), writer.file(ir[:-4] + ".bin"))
        spec["artifacts"] = {"openvino": ir}
    if chosen.portable:                  # a lowered graph: its portable twin is the part's ONNX
        portable = chosen.portable
    elif chosen.path.suffix == ".onnx":  # an ONNX Runtime candidate is the part's ONNX itself
        portable = chosen.path
    else:                                # an OpenVINO IR: the portable graph of the same weights
        portable = work / "decoder-wo.onnx" if chosen.name == "weight-only" else fp32_onnx
    writer.copy_in(portable, spec["onnx"])
    if chosen.name.endswith("-lowered"):
        from edgevl.exporters.lower.onnxruntime_decoder import LOWERED_FILE

        writer.copy_in(kv["graphs"][chosen.name] if kv and kv["kept"] else chosen.path, LOWERED_FILE)
        spec["artifacts"] = {"onnxruntime": LOWERED_FILE}
        lowered = lowered[chosen.name[:-len("-lowered")]]
        spec["lowered"] = {"onnxruntime": {"file": LOWERED_FILE, "from": spec["onnx"], "ops": sorted(lowered["ops"]),
                                           "nodes": lowered["nodes"], "portable_nodes": lowered["portable_nodes"],
                                           "weights": lowered["weights"],
                                           "tool": "edgevl.exporters.lower.onnxruntime_decoder"}}
    spec["precision"], spec["method"] = chosen.precision, chosen.method
    if kv and kv["kept"]:
        spec["kv_cache"] = {"onnxruntime": "int8"}
        spec["method"] += "; int8 KV cache (per channel, calibrated)"
    log(f"  decoder: {chosen.name} ({spec['method']})")
    wo = recipes.get(chosen.name.removesuffix("-lowered"), wo)
    if prefill_graph is not None:
        pre, hybrid = prefill_graph
        writer.copy_in(kv["graphs"][pre.name] if kv and kv["kept"] else pre.path, PREFILL_FILE)
        spec["prefill"] = {"onnxruntime": PREFILL_FILE}
        spec["prefill_method"] = pre.method
        spec["method"] += "; prompts prefilled by the int8 graph (" + PREFILL_FILE + ")"
        log(f"  decoder prefill: {pre.name} -> {PREFILL_FILE} ({hybrid.timing['median_ms']:.1f} vs "
            f"{chosen.timing['median_ms']:.1f} ms per answer)")
        chosen = hybrid
    if kv:
        kv.pop("graphs")
    return {"precision": chosen.precision, "method": spec["method"], "recipe": wo.to_dict(), "tools": info,
            "selection": selection_record("decoder", target, cands, chosen, gate)}


PREFILL_FILE = "onnxruntime/decoder_prefill.onnx"
PREFILL_GAIN = 0.05       # a second copy of the weights (int8, ~1 byte a parameter) must save 5% of an answer
SHARED_HEAD_SLOWER = 0.05


def _int8_prefill(cands: list[Candidate], chosen: Candidate, recipe: CompositeRecipe, log):
    """int4 on ONNX Runtime: ORT 1.32's 4-bit MatMulNBits runs prompts (M > 1) slower than FP32 on
    an AVX2 CPU while DynamicQuantizeMatMul runs them ~1.6x faster than FP32 (576x1536, 220 rows:
    3.2-3.4 vs 2.7 vs 1.7 ms), so a lowered dynamic-INT8 graph may prefill what the 4-bit graph
    decodes; both write the same KV cache. Kept when it keeps the int8 gate and saves at least
    PREFILL_GAIN of a whole answer (it costs a second, int8, copy of the decoder in memory);
    -> (prefill candidate, the combined candidate) or None."""
    pre = next((c for c in cands if c.name == "dynamic-int8-lowered"), None)
    if pre is None or not chosen.name.endswith("-lowered") or pre.cosine is None or pre.cosine < recipe.min_cosine:
        return None
    cost = pre.timing["prefill_ms"] + recipe.answer_tokens * chosen.timing["step_ms"]
    saved = 1 - cost / chosen.timing["median_ms"]
    log(f"    {chosen.name} with {pre.name} prefill: {cost:.1f} ms per answer ({saved:+.1%}; kept at >= "
        f"{PREFILL_GAIN:.0%})")
    if saved < PREFILL_GAIN:
        return None
    hybrid = Candidate(f"{chosen.name}+int8-prefill", chosen.path, chosen.precision,
                       f"{chosen.method}; prefill: {pre.method}", chosen.build_s + pre.build_s,
                       timing={**chosen.timing, "median_ms": round(cost, 2), "prefill_ms": pre.timing["prefill_ms"]},
                       cosine=min(chosen.cosine, pre.cosine), portable=chosen.portable)
    return pre, hybrid


def _shared_head(prefill_graph: tuple, chosen: Candidate, target: str, prompt: dict, recipe: CompositeRecipe, src,
                 threads, work: Path, info: dict, log) -> tuple:
    """The int8 prompt graph computes logits for one position, the first token's; with the 4-bit
    graph's LM head in it, the bundle holds one vocabulary-sized matrix fewer (SmolVLM shape: an
    int8 49,280 x 576 copy, 28 MB, and its packed form; the process's peak 555-565 -> 542 MB over
    three answers, prefill time unchanged). Kept when the prompt's logits keep the int4 gate and
    the prompt, timed beside the int8 head's, is at most SHARED_HEAD_SLOWER slower (one row: any
    difference is noise); -> the (prefill, combined) pair to use."""
    from edgevl.exporters.lower.onnxruntime_decoder import share_lm_head

    pre, hybrid = prefill_graph
    path = work / f"{pre.path.stem}-shared-head.onnx"
    swap = share_lm_head(pre.path, chosen.path, path)
    if swap is None:
        return prefill_graph
    shared = Candidate(pre.name, path, pre.precision, f"{pre.method}; LM head: the 4-bit graph's", pre.build_s)
    own = Candidate("int8-head", pre.path, pre.precision, pre.method)          # timed again beside it
    measure([own, shared], target, [prompt], _reference_outputs(src, "decoder", [prompt], threads), recipe.rounds,
            threads, lambda *a: None, outputs=("logits",))
    before, after = own.timing["median_ms"], shared.timing["median_ms"]
    gate = recipe.int4_min_cosine
    kept = shared.cosine >= gate and after <= before * (1 + SHARED_HEAD_SLOWER)
    info["prefill_lm_head"] = {**swap, "kept": kept, "cosine": round(shared.cosine, 6), "gate": gate,
                               "prefill_ms": after, "int8_head_prefill_ms": before}
    log(f"    prefill graph with the 4-bit LM head: {'kept' if kept else 'not kept'} (cosine {shared.cosine:.5f}, gate "
        f"{gate}; prompt {after:.1f} vs {before:.1f} ms; {swap['bytes_dropped'] / 2**20:.1f} MB of int8 head dropped)")
    if not kept:
        return prefill_graph
    shared.timing = {**pre.timing, "prefill_ms": after}
    cost = after + recipe.answer_tokens * chosen.timing["step_ms"]
    hybrid = Candidate(hybrid.name, hybrid.path, hybrid.precision, f"{chosen.method}; prefill: {shared.method}",
                       hybrid.build_s, timing={**hybrid.timing, "median_ms": round(cost, 2), "prefill_ms": after},
                       cosine=min(chosen.cosine, shared.cosine), portable=hybrid.portable)
    return shared, hybrid


def _int8_kv(src, chosen: Candidate, prefill: Candidate | None, held: list[dict], recipe: CompositeRecipe,
             gate: float, calib, work: Path, threads, log) -> dict:
    """Try the chosen lowered decoder (and its int8 prefill graph) with an int8 KV cache
    (exporters/lower/kv_int8.py): scales calibrated on ``recipe.kv_calib_prompts`` prompts of the
    calibration source through the FP32 bundle; kept when the decoder's logits keep ``gate`` vs
    FP32 on the held-out feeds and, for ``kv_cache="auto"``, a decode step summed over the answer's
    own position and KV_LONG_POSITION costs less than with the float cache.
    -> the record for the manifest, with ``kept`` and (until placed) the int8 ``graphs`` by name."""
    from edgevl.exporters.lower.kv_int8 import calibrate_kv_scales, int8_feeds, with_int8_kv_cache
    from edgevl.runtimes.compare import diff_outputs

    spec = src.manifest["decoder"]
    t0 = time.perf_counter()
    scales = calibrate_kv_scales(src, calib, recipe.kv_calib_prompts, threads)
    graphs, info = {}, None
    for c in [chosen, prefill] if prefill else [chosen]:
        graphs[c.name] = work / f"{c.path.stem}-kv8.onnx"
        info = with_int8_kv_cache(c.path, scales, graphs[c.name])
    record = {**info, "calibration": f"{recipe.kv_calib_prompts} prompts of {calib}", "mode": recipe.kv_cache,
              "build_s": round(time.perf_counter() - t0, 1), "graphs": graphs}

    reference = _reference_outputs(src, "decoder", held, threads)
    runners = {name: _runner("onnxruntime", path, chosen.precision, threads) for name, path in graphs.items()}
    float_cache = _runner("onnxruntime", chosen.path, chosen.precision, threads)
    try:
        cos = 1.0
        for f, ref in zip(held, reference):
            graph = prefill.name if prefill and f["inputs_embeds"].shape[1] > 1 else chosen.name
            out = runners[graph].infer(int8_feeds(f, scales))
            cos = min(cos, min(d.cosine for d in diff_outputs(ref, out, ("logits",))))
        record["cosine"] = round(cos, 6)
        steps = [f for f in held if f["inputs_embeds"].shape[1] == 1]
        short = int(max(steps, key=lambda f: int(f["past_len"].max()))["past_len"].max()) if steps else 0
        long_pos = min(KV_LONG_POSITION, int(spec["max_position"]) - 1)
        record["step_ms"] = {}
        for pos in sorted({short, long_pos}):
            step = _step_feed(src, pos)
            record["step_ms"][str(pos)] = _interleaved(
                {"float32": (float_cache, step), "int8": (runners[chosen.name], int8_feeds(step, scales))},
                recipe.rounds)
    finally:
        for r in [*runners.values(), float_cache]:
            r.close()
    at_long, at_short = record["step_ms"][str(long_pos)], record["step_ms"][str(short)]
    faster = at_long["int8"] + at_short["int8"] < at_long["float32"] + at_short["float32"]
    record["kept"] = cos >= gate and (faster or recipe.kv_cache == "int8")
    why = (f"logits cosine {cos:.5f} (gate {gate}); step at position {long_pos}: {at_long['int8']:.2f} vs "
           f"{at_long['float32']:.2f} ms float, at {short}: {at_short['int8']:.2f} vs {at_short['float32']:.2f} ms")
    record["reason"] = why
    log(f"  decoder KV cache: {'int8' if record['kept'] else 'float32'} ({why})")
    return record


def _step_feed(src, position: int, seed: int = 0) -> dict:
    """One decode step's feed with ``position`` cached positions (random float K/V: only timing)."""
    spec = src.manifest["decoder"]
    rng = np.random.default_rng(seed)
    capacity = 1 << int(position).bit_length()
    shape = (1, int(spec["n_kv_heads"]), capacity, int(spec["head_dim"]))
    feed = {"inputs_embeds": rng.standard_normal((1, 1, int(spec["hidden_dim"]))).astype(np.float32) * 0.05,
            "past_len": np.array([position], np.int64)}
    for i in range(int(spec["n_layers"])):
        for kind in ("key", "value"):
            feed[f"past_{kind}.{i}"] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _interleaved(pairs: dict, rounds: int) -> dict:
    """{name: (runner, feed)} -> {name: median ms} over max(rounds, 20) rounds, the order reversed
    every round and a pause before each call: a call right after another session's runs slower
    while that session's threads still spin (measured: 9.2 vs 7.3 ms for the same 4-bit step)."""
    for runner, feed in pairs.values():
        runner.infer(feed)
    samples: dict[str, list[float]] = {name: [] for name in pairs}
    order = list(pairs)
    for _ in range(max(rounds, 20)):
        for name in order:
            runner, feed = pairs[name]
            time.sleep(0.05)
            t = time.perf_counter()
            runner.infer(feed)
            samples[name].append((time.perf_counter() - t) * 1e3)
        order.reverse()
    return {name: round(float(np.median(v)), 3) for name, v in samples.items()}


def answer_cost(cands: list[Candidate], target: str, steps: list[dict], prefill: dict, recipe: CompositeRecipe,
                src, threads, log) -> None:
    """Rank decoders by what an answer costs them, prefill + ``answer_tokens`` steps: a kernel that
    wins per step can lose the prompt (MatMulNBits' 8-bit integer kernel vs MatMulInteger on
    80-220-token prompts, benchmarks/results/bench_e2e.md). ``timing['median_ms']`` is that cost."""
    quiet = lambda *a: None                                                   # noqa: E731
    measure(cands, target, [prefill], _reference_outputs(src, "decoder", [prefill], threads), recipe.rounds,
            threads, quiet, outputs=("logits",))
    first = {c.name: (c.timing, c.cosine) for c in cands}
    measure(cands, target, steps, _reference_outputs(src, "decoder", steps, threads), recipe.rounds, threads, quiet,
            outputs=("logits",))
    for c in cands:
        pre, cos = first[c.name]
        step = c.timing
        c.cosine = min(cos, c.cosine)
        c.timing = {"median_ms": round(pre["median_ms"] + recipe.answer_tokens * step["median_ms"], 2),
                    "prefill_ms": pre["median_ms"], "step_ms": step["median_ms"],
                    "step_p10_ms": step["p10_ms"], "step_p90_ms": step["p90_ms"], "runs": step["runs"]}
        log(f"    {c.name:<26} {c.timing['median_ms']:9.1f} ms per answer (prefill {pre['median_ms']:.1f} + "
            f"{recipe.answer_tokens} x {step['median_ms']:.2f}), cosine {c.cosine:.5f}")


def _place(writer, part: str, target: str, chosen: Candidate, src) -> None:
    """Write the chosen candidate into the bundle as the part's ONNX (ONNX Runtime) or as its
    OpenVINO artefact (the FP32 ONNX then stays the part's portable file)."""
    import shutil

    spec = writer.manifest["parts"][part]
    if chosen.path.suffix == ".xml":
        rel = f"{OPENVINO_DIR}/{part}.xml"
        shutil.copyfile(chosen.path, writer.file(rel))
        shutil.copyfile(chosen.path.with_suffix(".bin"), writer.file(rel[:-4] + ".bin"))
        writer.copy_in(src.part_file(part), spec["onnx"])
        spec["artifacts"] = {"openvino": rel}
    else:
        writer.copy_in(chosen.path, spec["onnx"])
    spec["precision"], spec["method"] = chosen.precision, chosen.method


def composite_bundle(bundle, out, target: str, recipe: CompositeRecipe = CompositeRecipe(), calib="world",
                     budget_points: float = 1.0, accept_loss: bool = False, eval_scenes: int = 200,
                     threads: int | None = None, force: bool = False, log=print):
    """Write the ``int8`` / ``int4`` bundle of an FP32 bundle for ``target`` -> Bundle."""
    import tempfile

    from edgevl.exporters.quantize.calibration import parse_source, vision_feeds
    from edgevl.exporters.quantize.decoder_feeds import held_out_feeds
    from edgevl.exporters.quantize.derive import as_bundle, derived_writer, require_fp32, staged_bundle, tool_versions
    from edgevl.exporters.quantize.report import (REPORT_FILE, AccuracyEvaluator, budget_verdict, parts_report,
                                                  summary_lines)

    recipe.validate(target)
    t0 = time.perf_counter()
    src = as_bundle(bundle)
    require_fp32(src, f"--precision {recipe.precision}")
    missing = [p for p in ("vision", "embed", "decoder") if p not in src.parts]
    if missing:
        raise QuantizationError(f"{src.path} has no part(s) {missing}; the composite recipe needs vision, embed and "
                                "decoder")
    log(f"composite: {src.path} -> {out} ({recipe.precision} for {target}: each part's candidates timed on this "
        "machine)")
    held, ref_vision = _held_out(src, recipe.held_out_images, threads)
    writer = derived_writer(src, out, ["vision", "embed", "decoder"], force=force)
    work = Path(tempfile.mkdtemp(prefix=".candidates.", dir=writer.tmp.parent))
    try:
        names = recipe.vision_candidates or VISION_CANDIDATES[target]
        store = _candidate_store(src, target, names, recipe, calib)
        cands = _load_measured(store, src.part_file("vision"), log) if store else None
        if cands is None:
            calib_feeds = vision_feeds(parse_source(calib), src.manifest["preprocess"], recipe.calib_samples) \
                if {"nncf-int8", "static-qdq"} & set(names) else []
            log(f"  vision candidates on {target} ({recipe.rounds} interleaved rounds, batch 1):")
            cands = vision_candidates(src, target, store or work, names, calib_feeds)
            measure(cands, target, held["vision"], ref_vision, recipe.rounds, threads, log)
            if store:
                _save_measured(store, cands)
        order = ranked(cands, recipe.min_cosine)
        if not order:
            raise QuantizationError(f"no vision candidate kept cosine >= {recipe.min_cosine} vs FP32")
        embed = _embed(src, writer, target, work, recipe, threads, log)
        decoder = _decoder(src, writer, target, work, recipe, held["decoder"], threads, log, calib)
        backends = (target,)
        evaluator = AccuracyEvaluator.for_bundle(src, backends, eval_scenes, "val", 0, threads, log=log)
        for chosen in order:
            _place(writer, "vision", target, chosen, src)
            log(f"  vision: {chosen.name} ({chosen.method})")
            writer.manifest["precision"] = recipe.precision
            staged = staged_bundle(writer)
            tasks = evaluator.tasks(staged) if evaluator.metric != "none" else None
            verdict = budget_verdict(evaluator.losses(tasks) if tasks else {}, budget_points, evaluator.metric,
                                     accept_loss)
            if verdict["passed"] or accept_loss or chosen is order[-1]:
                break
            log(f"  {chosen.name} breaks the budget ({verdict['loss']}); trying the next-fastest vision candidate")
        report = {"reference": {"bundle": str(src.path), "precision": "fp32", "backend": "onnxruntime"},
                  "held_out": {"source": "world:test:12345", "feeds": {p: len(f) for p, f in held.items()}},
                  "parts": parts_report(src, staged, ["vision", "decoder"], held, backends, threads),
                  "tasks": tasks,
                  **({} if tasks else {"tasks_skipped": "no task accuracy for this model family; the gate is the "
                                                        f"parts' cosine >= {recipe.min_cosine}"}),
                  "budget": verdict}
        worst = min(r["outputs"]["image_embeds"]["cosine"] for r in report["parts"]["vision"].values())
        report["gate"] = {"image_embeds_cosine": worst, "min_cosine": recipe.min_cosine,
                          "passed": worst >= recipe.min_cosine}
        writer.write_json(REPORT_FILE, report)
        writer.manifest.setdefault("reports", {})["accuracy"] = REPORT_FILE
        writer.manifest["quantization"] = {
            "scheme": f"composite {recipe.precision}: the fastest measured recipe per part",
            "parts": {p: {"precision": writer.manifest["parts"][p].get("precision", "fp32"),
                          "method": writer.manifest["parts"][p].get("method", "FP32")}
                      for p in writer.manifest["parts"]},
            "decoder": decoder,
            "selection": {"vision": selection_record("vision", target, cands, chosen, recipe.min_cosine),
                          "embed": embed, "decoder": decoder.pop("selection")},
            "activations": "dynamic INT8 where a part is dynamic, else float", "recipe": recipe.to_dict(),
            "versions": tool_versions()}
        for line in summary_lines(report):
            log(line)
        if not report["gate"]["passed"] and not accept_loss:
            raise AccuracyBudgetExceeded(f"{recipe.precision}: image embeddings cosine {worst:.4f} < "
                                         f"{recipe.min_cosine} vs FP32 on held-out images; no bundle was written",
                                         report)
        if not verdict["passed"] and not accept_loss:
            raise AccuracyBudgetExceeded(
                f"{recipe.precision} loses {verdict['worst_loss']:.2f} points of {verdict['metric']} vs FP32 (budget "
                f"{budget_points}) with every vision candidate; no bundle was written. Try int8-wo or --accept-loss",
                report)
        result = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    log(f"composite: wrote {result.path} in {time.perf_counter() - t0:.1f} s")
    return result


_HELD_OUT: dict = {}


def _held_out(src, n_images: int, threads):
    """Held-out feeds and the FP32 vision outputs, computed once per FP32 bundle in a process (a
    user or `edgevl bench` building int8 and int4 for two backends needs them four times)."""
    key = (str(src.path.resolve()), src.manifest.get("created"), n_images)
    if key not in _HELD_OUT:
        from edgevl.exporters.quantize.decoder_feeds import held_out_feeds

        held = held_out_feeds(src, ["vision", "decoder"], n_images=n_images, threads=threads)
        _HELD_OUT.clear()
        _HELD_OUT[key] = (held, _reference_outputs(src, "vision", held["vision"], threads))
    return _HELD_OUT[key]


def _candidate_store(src, target: str, names, recipe: CompositeRecipe, calib) -> Path | None:
    """Where measured vision candidates of this FP32 vision part are kept (content-addressed by
    the part's sha256, the target, the candidates and how they were made), or None when the
    export cache is off. int8 and int4 builds share them: the vision part is the same."""
    import hashlib
    import json

    from edgevl import __version__
    from edgevl.exporters.export_cache import cache_enabled, cache_root

    if not cache_enabled():
        return None
    vision_sha = src.manifest["files"][src.parts["vision"]["onnx"]]["sha256"]
    payload = json.dumps({"vision": vision_sha, "target": target, "names": list(names), "edgevl": __version__,
                          "rounds": recipe.rounds, "held_out": recipe.held_out_images,
                          "calib": [str(calib), recipe.calib_samples] if {"nncf-int8", "static-qdq"} & set(names) else None},
                         sort_keys=True)
    return cache_root() / "candidates" / hashlib.sha256(payload.encode()).hexdigest()[:20]


MEASURED_FILE = "measured.json"


def _save_measured(store: Path, cands: list[Candidate]) -> None:
    import json

    from edgevl.bundle import sha256_file

    data = {"candidates": [{**{k: getattr(c, k) for k in ("name", "precision", "method", "build_s", "timing",
                                                            "cosine")},
                            # a candidate outside the store is the FP32 part itself (not copied)
                            "file": c.path.name if c.path.parent == store else None,
                            "sha256": sha256_file(c.path) if c.path.parent == store else None} for c in cands],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = store / (MEASURED_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(store / MEASURED_FILE)             # written last: its presence means every file is complete


def _load_measured(store: Path, fp32_part: Path, log) -> list[Candidate] | None:
    """The stored candidates when every file is there with its recorded sha256; else None (and
    the store is rebuilt)."""
    import json

    from edgevl.bundle import sha256_file

    store.mkdir(parents=True, exist_ok=True)
    meta = store / MEASURED_FILE
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    out = []
    for c in data["candidates"]:
        path = store / c["file"] if c["file"] else fp32_part
        intact = path.is_file() and (c["sha256"] is None or sha256_file(path) == c["sha256"])
        if not intact or path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            meta.unlink()
            return None
        out.append(Candidate(c["name"], path, c["precision"], c["method"], c["build_s"], c["timing"], c["cosine"]))
    log(f"  vision candidates: reusing the ones measured at {data['measured_at']} ({store})")
    for c in out:
        log(f"    {c.name:<26} {c.timing['median_ms']:9.1f} ms, cosine {c.cosine:.5f}")
    return out


def _reference_outputs(src, part: str, feeds: list[dict], threads) -> list[dict]:
    runner = _runner("onnxruntime", src.part_file(part), "fp32", threads)
    try:
        return [runner.infer(f) for f in feeds]
    finally:
        runner.close()


def _embed(src, writer, target: str, work: Path, recipe: CompositeRecipe, threads, log) -> dict:
    """ONNX Runtime: the INT8 embedding table when its lookups keep ``embed_min_cosine`` and are no
    slower than float (a lookup reads a few rows: the gain is memory). OpenVINO keeps float."""
    fp32 = Candidate("fp32", src.part_file("embed"), "fp32", "FP32 table")
    cands = [fp32]
    if target == "onnxruntime":
        cands.append(_built("dynamic-int8", "int8", "INT8 table (quantize_dynamic of Gather, per tensor)",
                            lambda p: _dynamic(fp32.path, p, "QUInt8", op_types=("Gather",)), work / "embed-int8.onnx"))
    vocab = int(src.manifest["decoder"]["vocab_size"])
    feeds = [{"input_ids": (np.arange(96, dtype=np.int64) * 7919 % vocab)[None, :]}]    # a prompt's worth of ids
    measure(cands, "onnxruntime", feeds, _reference_outputs(src, "embed", feeds, threads), recipe.rounds, threads,
            log=lambda *a: None)
    chosen = fp32
    if len(cands) > 1:
        q = cands[1]
        if q.cosine >= recipe.embed_min_cosine and q.timing["median_ms"] <= 1.1 * fp32.timing["median_ms"] + 0.2:
            chosen = q
    _place(writer, "embed", "onnxruntime", chosen, src)
    sizes = {c.name: round(c.path.stat().st_size / 1e6, 1) for c in cands}
    log(f"  embed: {chosen.name} ({chosen.method}; MB {sizes})")
    record = selection_record("embed", "onnxruntime", cands, chosen, recipe.embed_min_cosine)
    record["size_mb"] = sizes
    return record
