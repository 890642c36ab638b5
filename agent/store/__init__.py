"""Agent state on disk: chunked downloads, installed versions, the active pointer."""
