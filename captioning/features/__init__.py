"""Image features: the pretrained encoder (EfficientNet-Lite) and the cache of its outputs."""
