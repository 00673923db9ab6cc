"""littlebig: the Little-Big classifier cascade (arXiv 2406.17117) served on NVIDIA Triton."""

__version__ = "0.1.0"
