"""Image features: the pretrained encoder (EfficientNet-Lite), the cache of its outputs, drift of live images."""
