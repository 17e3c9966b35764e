"""Lowered decoder graphs: the portable decoder ONNX rewritten into one backend's fused operators.

A lowered graph is a compiled artefact like an OpenVINO IR or a TensorRT engine: the portable
ONNX stays ``parts.decoder.onnx`` (the source of truth every backend can run), and
``parts.decoder.artifacts[backend]`` names the lowered file, which only that backend's runner
loads. Its external interface is the portable decoder's (same inputs and outputs), so the
engine, the scheduler and the KV cache do not change.

Modules:
    portable_decoder      read a portable decoder ONNX back into weights and settings
    onnxruntime_decoder   ONNX Runtime contrib operators (GroupQueryAttention, ...) + lower_decoder()
"""
