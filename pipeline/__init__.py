"""Explaining VQA models reproducibly: one module per stage here, the library in subpackages."""
