"""Whetstone: contrastive and preference training on Ray, with a live FAISS index on Ray Serve.

Importing the package starts nothing (no ``ray.init``, no argv parsing).
"""

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``__version__`` (a source
    checkout on ``PYTHONPATH``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("whetstone")
    except PackageNotFoundError:
        return __version__
