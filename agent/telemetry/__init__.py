"""Device telemetry: inference latency, process and system metrics, thermal state, reporting."""
