"""SAM-Med3D fine-tuning for intracranial hemorrhage: model, CT data, clicks, prediction."""

__version__ = "0.1.0"
