"""Whetstone: contrastive and preference training on Ray, with a live FAISS index on Ray Serve.

Importing the package starts nothing (no ``ray.init``, no argv parsing).
"""

__version__ = "0.1.0"
