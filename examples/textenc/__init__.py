"""The textenc example: the pretrained all-MiniLM-L6-v2 sentence encoder on sentences from Python's own docstrings."""
