"""Training without a training framework: gradients built as ONNX graphs, fine-tuning in onnxruntime."""
