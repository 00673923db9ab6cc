"""Offline side of littlebig: train, export to ONNX (and TensorRT), MACs, calibration, report."""
