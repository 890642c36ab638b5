"""The vad example: Silero VAD, a stateful streaming ONNX model from the silero-vad wheel, on synthesised audio."""
