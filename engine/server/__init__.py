"""`nextn serve`: the OpenAI-compatible HTTP API on a Unix socket, metrics, systemd integration, clients."""
