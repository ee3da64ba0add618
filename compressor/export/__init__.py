"""Export a compressed model to ONNX with its weights still packed, and run the export without torch.

``exporter`` (torch side) writes the folder; ``runtime`` (numpy + onnxruntime + tokenizers only)
runs it. Nothing here imports torch at package import, so ``runtime`` stays torch-free.
"""
