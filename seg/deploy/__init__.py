"""Deployment: one graph from pixels to classes (normalisation, backbone with its positions fixed for
one size, head, upsampling, argmax), written as ONNX and checked against the eager model."""
