"""A stand-in ``pynvml`` for the one fault no machine here can show: an NVIDIA GPU whose
driver fails after NVML found it (a reset, ``NVML_ERROR_GPU_IS_LOST``, a timeout)."""

from __future__ import annotations

import types
from collections.abc import Callable


class NVMLError(Exception):
    """What nvidia-ml-py raises (its NVMLError), e.g. NVML_ERROR_GPU_IS_LOST."""


def fake_nvml(*, init_fails: bool = False) -> tuple[types.ModuleType, dict[str, bool]]:
    """A stand-in ``pynvml`` with one device, imported the way the adapter imports it. There
    is no GPU here, and a driver that fails mid-run cannot be made to: only that is faked."""
    state = {"lost": False}
    nvml = types.ModuleType("pynvml")

    def init() -> None:
        if init_fails:
            raise NVMLError("driver not loaded")

    def unless_lost(value: object) -> Callable[..., object]:
        def call(*args: object) -> object:
            if state["lost"]:
                raise NVMLError("gpu is lost")
            return value

        return call

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = unless_lost(1)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = unless_lost("device 0")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = unless_lost([])  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetGraphicsRunningProcesses = unless_lost([])  # type: ignore[attr-defined]
    return nvml, state
