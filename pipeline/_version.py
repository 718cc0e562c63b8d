"""The version, in a module of its own: both import names (`pipeline`, `synthaug`) read it."""

__version__ = "0.2.0"
