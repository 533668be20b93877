"""V4 building blocks composed from the ops: attention layer with its cache, MoE, decoder block,
model configurations (used by the demo, the benchmarks and the layer tests)."""
from .config import V4Config, compress_ratio_of_layer

__all__ = ["V4Config", "compress_ratio_of_layer"]
