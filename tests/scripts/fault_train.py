"""`reprogrammer train` on the engine tests' colour data, with faults injected (tests/test_faults.py).

    python tests/scripts/fault_train.py '[PHASE, ...]'

Each phase is a JSON object: `args` (the `reprogrammer` command line), and optionally
`signal_at_sample` + `signal` (send that signal to this process when the training set serves
its K-th sample: SIGTERM/SIGINT stop after the step in progress, SIGKILL dies in it),
`kill_after_file` (SIGKILL right after the N-th tensor file of the phase's checkpoints is
written), `slow` (seconds of sleep per training sample) and `fsize` (an RLIMIT_FSIZE in bytes
for the phase: a full disk). One JSON line `{"exit": code}` is printed per finished phase.
Phases share one process so that the imports are paid once.
"""
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import reprogrammer.data.loaders as loaders  # noqa: E402
import reprogrammer.data.suites as suites  # noqa: E402
from reprogrammer import cli  # noqa: E402
from reprogrammer.runs import checkpoint  # noqa: E402
from tests.engine_data import train_data  # noqa: E402

SAVE_FILE = checkpoint.save_file
# Faults are injected where the training set serves a sample. The resident and memory-mapped
# loaders gather whole batches from the array instead, so these runs (the uninterrupted references
# too) take the per-sample path, which tests/test_loaders.py checks equal to them bitwise.
loaders.ArrayImageDataset = type("PerSampleOnly", (), {})


def faulty_data(phase: dict):
    data = train_data(n_train=24, n_val=8)
    base = type(data.train)
    served = {"n": 0}

    def getitem(self, index):
        served["n"] += 1
        if served["n"] == phase.get("signal_at_sample"):
            os.kill(os.getpid(), getattr(signal, phase["signal"]))
        if phase.get("slow"):
            time.sleep(phase["slow"])
        return base.__getitem__(self, index)

    data.train.__class__ = type("Faulty" + base.__name__, (base,), {"__getitem__": getitem})
    return data


def faulty_save_file(phase: dict):
    written = {"n": 0}

    def save_file(tensors, path):
        SAVE_FILE(tensors, path)
        written["n"] += 1
        if written["n"] == phase.get("kill_after_file"):
            os.kill(os.getpid(), signal.SIGKILL)

    return save_file


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for phase in json.loads(sys.argv[1]):
        suites.build_train_data = lambda cfg, phase=phase: faulty_data(phase)
        checkpoint.save_file = faulty_save_file(phase)
        resource.setrlimit(resource.RLIMIT_FSIZE, (phase.get("fsize", soft), hard))
        code = cli.main(phase["args"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print(json.dumps({"exit": code}), flush=True)


if __name__ == "__main__":
    main()
