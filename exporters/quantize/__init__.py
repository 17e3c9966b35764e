"""Quantization: calibration data, INT8 PTQ to explicit Q/DQ ONNX, decoder weight-only INT8/INT4,
QAT with NNCF, and the accuracy report every quantized bundle carries.

Calibrate once, deploy everywhere: the Q/DQ ONNX written here runs as real INT8 on ONNX Runtime
(x86, ARM64), OpenVINO (x86) and TensorRT (explicit quantization). Backend-specific artefacts
(an OpenVINO IR from NNCF, weight-compressed IR) are extras recorded per backend in the manifest.

Modules (each small, one concern):
    recipes         typed dataclasses for PTQ, weight-only and QAT, validated up front
    calibration     calibration sources (image folder, video, synthetic world, arrays) + transform
    decoder_feeds   realistic decoder inputs (prefill + decode steps with real KV caches)
    float_rules     which nodes stay in float, and why
    ptq             `edgevl quantize`: ONNX Runtime quantize_static per part -> Q/DQ bundle
    sensitivity     keep the worst nodes in float until the accuracy budget holds
    weight_only     MatMulNBits (ONNX Runtime) and NNCF weight compression (OpenVINO IR)
    openvino_int8   NNCF INT8 of the OpenVINO model, for `edgevl build --target openvino`
    qat             `edgevl qat`: NNCF fake-quant fine-tuning -> native Q/DQ -> export path
    report          accuracy.json: per-part cosine / max abs diff and task accuracy vs FP32
    derive          writing a quantized bundle derived from an FP32 one
"""
