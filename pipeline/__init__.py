"""synthaug: batch dataset augmentation through a rate-limited, resumable image API client.

The Python API lives in `pipeline.api`; import it as ``synthaug`` (see that package).
"""

from ._version import __version__

__all__ = ["__version__"]
