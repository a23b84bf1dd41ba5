"""Clients: the ClientApp, local DP training, site data loading, the client launcher."""
