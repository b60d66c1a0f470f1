"""Serving engines: what runs a loaded model's forward pass for predictions.

``engines`` names them (torch-free, for settings and views); ``onnx_runner`` runs an exported
model with ONNX Runtime; ``agreement`` compares two engines' probabilities; ``int8`` makes a
statically quantized model; ``prepare`` is the one-off work per model (export, parity check,
int8 and its guard) that ``ftune serving-check`` runs in a child process of the API.
"""
