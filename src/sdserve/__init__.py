"""sdserve: a self-hosted, ModelsLab-compatible Stable Diffusion API server."""

__version__ = "0.1.0"
