"""Train the engine-test model; run directly (1 process) or under torchrun (2 gloo ranks)."""
import sys

from reprogrammer.config import load_config
from reprogrammer.training.engine import train
from tests.engine_data import train_data
from tests.helpers import tiny_clip

if __name__ == "__main__":
    run_dir, *overrides = sys.argv[1:]
    train(load_config(None, tuple(overrides)), run_dir, train_data(), clip=tiny_clip(), progress=False)
