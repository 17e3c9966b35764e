"""The compile side: PyTorch -> ONNX parts -> Q/DQ INT8 / weight-only -> TensorRT/OpenVINO/ORT.

Needs the ``export`` extra (torch, onnx, nncf, transformers). Nothing here is imported by the
on-device runtime.
"""
