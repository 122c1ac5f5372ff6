"""Training: the engine (AMP, torch.compile, DDP, exact resume), checkpoints, distributed helpers,
the methods' optimisers and schedules, GPU telemetry, and restoring a trained run."""
