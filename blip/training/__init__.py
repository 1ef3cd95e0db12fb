"""Training the report model: BLIP-2 stage 1 and 2 on the shared engine, and the LM's text pre-training.

from blip.training import ReportTrainingConfig, run_training
"""

from .train import ReportTrainingConfig, run_training

__all__ = ["ReportTrainingConfig", "run_training"]
