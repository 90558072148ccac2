"""action3d: spatiotemporal 3D CNNs for video action recognition, as a managed workflow."""

__version__ = "0.1.0"
