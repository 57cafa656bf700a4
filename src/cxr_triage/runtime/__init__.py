"""Layer: torch-free inference: onnxruntime engine, predict, advice."""
