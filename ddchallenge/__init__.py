"""ddchallenge: generative dataset distillation under the rules of the ECCV 2024
Dataset Distillation Challenge."""

__version__ = "0.1.0"
