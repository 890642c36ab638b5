"""edgefleet builder: compress, export, measure, gate and package models per device profile."""

from agent import __version__

__all__ = ["__version__"]
