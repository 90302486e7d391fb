"""sq2trt: SmoothQuant -> Q/DQ ONNX -> TensorRT / ONNX Runtime INT8 engines, with accuracy reports."""
__version__ = "0.1.0"
