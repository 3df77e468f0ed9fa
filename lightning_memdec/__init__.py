"""lightning_memdec: the Memory Decoder (Cao et al., 2025) as a PyTorch Lightning package."""

__version__ = "0.1.0"
