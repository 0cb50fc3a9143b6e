"""Frozen pretrained networks: what exists (registry), Keras builders, weight readers, the LiteRT runtime."""
