"""GpuTelemetry: the NVML-less path for real, the sampling path through a fake `pynvml`."""
import logging
import random
import statistics
import sys
import threading
import time
import types

import pytest
import torch

from reprogrammer.training import telemetry
from reprogrammer.training.telemetry import METRICS, GpuTelemetry, nvml_driver_version


class FakeNvml:
    """Stands in for the `pynvml` module: random readings, recorded as the expected values."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, seed=0, unsupported=(), fail_init=False, fail_handle=False):
        self.rng = random.Random(seed)
        self.unsupported = set(unsupported)
        self.fail_init, self.fail_handle = fail_init, fail_handle
        self.inits = self.shutdowns = 0
        self.opened = []
        self.expected = {metric: [] for metric in METRICS}

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def _open(self, how, key):
        if self.fail_handle:
            raise self.NVMLError("Invalid Argument")
        self.opened.append((how, key))
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._open("index", index)

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        return self._open("pci", bus_id)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU 80GB"  # older pynvml releases return bytes

    def nvmlSystemGetDriverVersion(self):
        return "999.12"

    def _reading(self, name, value, *metrics_and_values):
        assert self.opened, "queried before a handle was opened"
        if name in self.unsupported:
            raise self.NVMLError("Not Supported")
        for metric, expected in metrics_and_values:
            self.expected[metric].append(expected)
        return value

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu, mem = self.rng.randint(1, 100), self.rng.randint(1, 100)
        return self._reading("util", types.SimpleNamespace(gpu=gpu, memory=mem),
                             ("gpu_util_pct", gpu), ("mem_util_pct", mem))

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = self.rng.randint(1, 80 << 30)
        return self._reading("memory", types.SimpleNamespace(used=used, total=80 << 30),
                             ("mem_used_mib", used / (1024 * 1024)))

    def nvmlDeviceGetPowerUsage(self, handle):
        milliwatts = self.rng.randint(60_000, 700_000)
        return self._reading("power", milliwatts, ("power_w", milliwatts * 1e-3))

    def nvmlDeviceGetClockInfo(self, handle, clock):
        assert clock == self.NVML_CLOCK_SM
        mhz = self.rng.randint(345, 1980)
        return self._reading("clock", mhz, ("sm_clock_mhz", mhz))

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        celsius = self.rng.randint(25, 90)
        return self._reading("temp", celsius, ("temp_c", celsius))


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(**kwargs):
        fake = FakeNvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def telemetry_threads():
    return [t for t in threading.enumerate() if t.name == "gpu-telemetry"]


def busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.005)


def test_summary_matches_the_readings(fake_nvml):
    fake = fake_nvml(seed=7)
    with GpuTelemetry(interval=0.01) as tel:
        busy(0.15)
    summary = tel.summary()
    assert summary["available"] is True
    assert summary["device"] == "Fake GPU 80GB" and summary["driver"] == "999.12"
    assert summary["device_index"] == 0 and summary["interval_s"] == 0.01
    assert fake.opened == [("index", 0)]
    n = len(tel.samples)
    assert n >= 3 and summary["samples"] == n
    assert 0.15 <= summary["duration_s"] < 5
    times = [s["t_s"] for s in tel.samples]
    assert times == sorted(times) and times[0] >= 0
    for metric in METRICS:
        expected = fake.expected[metric]
        assert [s[metric] for s in tel.samples] == pytest.approx(expected), metric
        assert summary[metric] == pytest.approx(
            {"mean": statistics.fmean(expected), "min": min(expected), "max": max(expected)}
        ), metric


def test_lifecycle_joins_thread_and_shuts_nvml_down(fake_nvml):
    fake = fake_nvml()
    tel = GpuTelemetry(device_index=3, interval=0.01)
    tel.start()
    assert tel.running and len(telemetry_threads()) == 1
    with pytest.raises(RuntimeError, match="already running"):
        tel.start()
    tel.stop()
    tel.stop()  # idempotent
    assert not tel.running and telemetry_threads() == []
    assert fake.inits == fake.shutdowns == 1
    assert fake.opened == [("index", 3)]
    count = len(tel.samples)
    busy(0.05)
    assert len(tel.samples) == count >= 1, "sampling went on after stop()"


def test_exception_inside_block_still_stops(fake_nvml):
    fake = fake_nvml()
    with pytest.raises(ZeroDivisionError):
        with GpuTelemetry(interval=0.01) as tel:
            1 / 0
    assert not tel.running and telemetry_threads() == []
    assert fake.inits == fake.shutdowns == 1
    assert tel.summary()["samples"] >= 1, "the first sample is taken at start"


def test_restart_clears_samples(fake_nvml):
    fake = fake_nvml()
    tel = GpuTelemetry(interval=0.01)
    with tel:
        busy(0.05)
    with tel:
        pass
    assert fake.inits == fake.shutdowns == 2
    assert len(tel.samples) == tel.summary()["samples"] >= 1
    assert tel.samples[0]["t_s"] < 0.05


def test_unsupported_metrics_are_none(fake_nvml):
    fake_nvml(unsupported={"util", "power"})
    with GpuTelemetry(interval=0.01) as tel:
        busy(0.03)
    summary = tel.summary()
    for metric in ("gpu_util_pct", "mem_util_pct", "power_w"):
        assert summary[metric] is None
        assert all(s[metric] is None for s in tel.samples)
    for metric in ("mem_used_mib", "sm_clock_mhz", "temp_c"):
        assert summary[metric]["min"] > 0


def test_cuda_device_is_found_by_pci_address(fake_nvml, monkeypatch):
    fake = fake_nvml()
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(pci_domain_id=1, pci_bus_id=0x3B, pci_device_id=0x1F)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    with GpuTelemetry(interval=0.01) as tel:
        pass
    assert asked == [2] and tel.summary()["device_index"] == 2
    assert fake.opened == [("pci", "00000001:3b:1f.0")]


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda mp, fake: mp.setitem(sys.modules, "pynvml", None), "install nvidia-ml-py"),
        (lambda mp, fake: fake(fail_init=True), "NVML not available (NVML Shared Library"),
        (lambda mp, fake: fake(fail_handle=True), "cannot open CUDA device 5 (Invalid"),
    ],
    ids=["no-package", "no-driver", "no-device"],
)
def test_without_nvml_logs_once_and_reports_why(monkeypatch, fake_nvml, caplog, setup, reason):
    setup(monkeypatch, fake_nvml)
    caplog.set_level(logging.WARNING, logger=telemetry.__name__)
    with GpuTelemetry(device_index=5) as tel:
        pass
    tel.stop()
    summary = tel.summary()
    assert summary["available"] is False and reason in summary["reason"]
    assert tel.samples == [] and telemetry_threads() == []
    fake = sys.modules["pynvml"]
    if isinstance(fake, FakeNvml):
        assert fake.inits == fake.shutdowns
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("GPU telemetry off: ")


def nvml_loads():
    try:
        with telemetry.nvml_session():
            return True
    except telemetry.NvmlUnavailable:
        return False


@pytest.mark.skipif(nvml_loads(), reason="this machine has NVML")
def test_real_machine_without_nvml():
    with GpuTelemetry() as tel:
        pass
    assert tel.summary()["available"] is False
    assert nvml_driver_version() is None


def test_summary_before_start_says_so():
    summary = GpuTelemetry().summary()
    assert summary == {"available": False, "reason": summary["reason"]}
    assert "not started" in summary["reason"]


def test_driver_version_through_fake(fake_nvml):
    fake = fake_nvml()
    assert nvml_driver_version() == "999.12"
    assert fake.inits == fake.shutdowns == 1


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_bad_interval(interval):
    with pytest.raises(ValueError, match="interval must be a positive"):
        GpuTelemetry(interval=interval)
