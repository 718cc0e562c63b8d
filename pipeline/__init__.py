"""synthaug: batch dataset augmentation through a rate-limited, resumable image API client."""

__version__ = "0.1.0"
