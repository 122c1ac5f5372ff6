"""Training: the Trainer (AMP, torch.compile, DDP, exact resume), distributed set-up, GPU
telemetry and metric tracking. Run directories and checkpoints live in `reprogrammer.runs`."""
