"""fedsilo: privacy-preserving federated learning across data-center sites.

One Flower ServerApp and one ClientApp, used unchanged by `fedsilo simulate`
(Flower's simulation engine) and by real deployments (`flower-superlink` and
`flower-supernode` over TLS). Each site trains with Opacus DP-SGD under a
privacy budget the site owns.
"""

__version__ = "0.1.0"
