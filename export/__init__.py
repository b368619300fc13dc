"""Exporters: trace VLMs with DART as a graph op into ONNX models and TensorRT engines."""
