"""codeq: joint pruning + quantization experiments with CoDeQ dead-zone quantizers."""

__version__ = "0.1.0"
