"""mme5: multimodal, multilingual embedding models trained the mmE5 way."""

__version__ = "0.1.0"
