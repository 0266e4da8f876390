"""qcompile: a compiler for quantized neural networks."""
__version__ = "0.1.0"
