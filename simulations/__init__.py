"""Simulations: data partitioning, the simulation runner, scenarios."""
