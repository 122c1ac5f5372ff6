"""GPU telemetry during a benchmark or training run, read through NVML in a background thread.

    with GpuTelemetry(device_index=0, interval=0.1) as tel:
        train()
    print(tel.summary())

Without an NVIDIA driver (or without `nvidia-ml-py`) nothing fails: one warning is logged
and `summary()` returns `{"available": False, "reason": ...}`, so the same code runs on CPU
machines and in CI.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

# Sampled metrics, in the order of each sample dict; `t_s` (seconds since start) comes first.
METRICS = ("gpu_util_pct", "mem_util_pct", "mem_used_mib", "power_w", "sm_clock_mhz", "temp_c")


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why."""


@contextlib.contextmanager
def nvml_session() -> Iterator[ModuleType]:
    """Yield an initialised `pynvml` module and shut NVML down afterwards.

    Raises `NvmlUnavailable` when the package or the driver's NVML library is missing.
    NVML counts its initialisations, so sessions may nest (telemetry running while the
    environment record reads the driver version).
    """
    try:
        import pynvml
    except ImportError as err:
        raise NvmlUnavailable(f"pynvml not importable ({err}); install nvidia-ml-py") from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise NvmlUnavailable(f"NVML not available ({err})") from err
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def nvml_driver_version() -> str | None:
    """The NVIDIA driver version, or None where NVML is unavailable."""
    try:
        with nvml_session() as nvml:
            return _text(nvml.nvmlSystemGetDriverVersion())
    except NvmlUnavailable:
        return None


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes for names and versions.
    return value.decode() if isinstance(value, bytes) else value


def _device_handle(nvml: ModuleType, device_index: int):
    """NVML handle of CUDA device `device_index`.

    CUDA and NVML number devices differently once CUDA_VISIBLE_DEVICES reorders or hides
    them, so a device torch can see is found by its PCI address; without CUDA in torch the
    index is taken as NVML's own.
    """
    if not torch.cuda.is_available():
        return nvml.nvmlDeviceGetHandleByIndex(device_index)
    props = torch.cuda.get_device_properties(device_index)
    bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)


class GpuTelemetry:
    """Sample one GPU's utilisation, memory, power, SM clock and temperature every `interval` s.

    `device_index` is a CUDA device index as torch numbers them (default: the current CUDA
    device, or 0 without CUDA). Samples are dicts with `t_s` and the `METRICS` keys; a metric
    the device does not report (e.g. utilisation under MIG) is None.
    """

    def __init__(self, device_index: int | None = None, interval: float = 0.1):
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.device_index = device_index
        self.interval = float(interval)
        self.samples: list[dict[str, float | None]] = []
        self.reason: str | None = "not started; use `with GpuTelemetry(...)` or call start()"
        self.device_name: str | None = None
        self.driver: str | None = None
        self._session: contextlib.ExitStack | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = 0.0
        self._duration_s = 0.0

    def __enter__(self) -> GpuTelemetry:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Open NVML and start sampling; on a machine without NVML, log why and do nothing."""
        if self.running:
            raise RuntimeError("GpuTelemetry is already running; call stop() before start()")
        self.samples = []
        self.reason = None
        with contextlib.ExitStack() as stack:
            try:
                nvml = stack.enter_context(nvml_session())
            except NvmlUnavailable as err:
                self._off(str(err))
                return
            if self.device_index is None:
                self.device_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            try:
                handle = _device_handle(nvml, self.device_index)
                self.device_name = _text(nvml.nvmlDeviceGetName(handle))
                self.driver = _text(nvml.nvmlSystemGetDriverVersion())
            except nvml.NVMLError as err:
                self._off(f"NVML cannot open CUDA device {self.device_index} ({err})")
                return
            # Keep NVML open past this block: stop() closes it after joining the thread.
            self._session = stack.pop_all()
        self._stop.clear()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(nvml, handle), name="gpu-telemetry", daemon=True
        )
        self._thread.start()

    def _off(self, reason: str) -> None:
        self.reason = reason
        logger.warning("GPU telemetry off: %s", reason)

    def stop(self) -> None:
        """Stop sampling, join the thread and shut NVML down; a no-op when not running."""
        if not self.running:
            return
        self._stop.set()
        self._thread.join()
        self._duration_s = time.monotonic() - self._t0
        self._thread = None
        self._session.close()
        self._session = None

    def _run(self, nvml: ModuleType, handle) -> None:
        # Sample at once, so that even a block shorter than `interval` yields one sample.
        while True:
            self.samples.append(self._sample(nvml, handle))
            if self._stop.wait(self.interval):
                return

    def _sample(self, nvml: ModuleType, handle) -> dict[str, float | None]:
        def read(query, *args):
            try:
                return query(handle, *args)
            except nvml.NVMLError:
                return None

        util = read(nvml.nvmlDeviceGetUtilizationRates)
        memory = read(nvml.nvmlDeviceGetMemoryInfo)
        power_mw = read(nvml.nvmlDeviceGetPowerUsage)
        sm_clock = read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        temp = read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        return {
            "t_s": time.monotonic() - self._t0,
            "gpu_util_pct": None if util is None else float(util.gpu),
            "mem_util_pct": None if util is None else float(util.memory),
            "mem_used_mib": None if memory is None else memory.used / 2**20,
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "sm_clock_mhz": None if sm_clock is None else float(sm_clock),
            "temp_c": None if temp is None else float(temp),
        }

    def summary(self) -> dict:
        """Mean / min / max of each metric over the samples so far (None if never reported)."""
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        samples = list(self.samples)
        duration = time.monotonic() - self._t0 if self.running else self._duration_s
        out = {
            "available": True,
            "device": self.device_name,
            "driver": self.driver,
            "device_index": self.device_index,
            "interval_s": self.interval,
            "duration_s": duration,
            "samples": len(samples),
        }
        for metric in METRICS:
            values = [s[metric] for s in samples if s[metric] is not None]
            out[metric] = (
                {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        return out
