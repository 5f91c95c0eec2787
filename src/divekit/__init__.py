"""divekit: the Dive into Deep Learning course as a tested, runnable toolkit on PyTorch."""

from divekit.errors import DivekitError

__version__ = "0.1.0"
__all__ = ["DivekitError", "__version__"]
