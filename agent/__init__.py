"""edgefleet agent: the device half (torch-free). Also home of the shared protocol code."""

__version__ = "0.1.0"
