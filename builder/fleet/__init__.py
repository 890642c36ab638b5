"""Fleet side of the builder: publish artifacts to the broker and set desired deployments."""
