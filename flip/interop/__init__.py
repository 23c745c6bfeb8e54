"""Interoperability with other CLIP code bases (OpenCLIP export / import)."""
