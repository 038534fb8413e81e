"""IOP-FL: inside and outside personalized federated segmentation, on PyTorch Lightning."""

__version__ = "0.1.0"
