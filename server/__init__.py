"""Server: the ServerApp, aggregation strategy, central evaluation, checkpoints, launcher."""
