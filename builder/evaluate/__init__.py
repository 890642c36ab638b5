"""Measure a candidate against the fp32 reference: accuracy, output error, latency, memory, size."""
