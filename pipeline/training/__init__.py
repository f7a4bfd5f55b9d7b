"""Training: synthetic sets with exact ground truth, and training / fine-tuning DRN models."""
