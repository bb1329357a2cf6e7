"""OncoFusion: multimodal cancer-prediction models as MONAI bundles, served by one MONAI Label app."""

__version__ = "0.1.0"
