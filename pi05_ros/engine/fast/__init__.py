"""The fast path's building blocks (re-packed weights and their math). Imports no GPU-only module."""
