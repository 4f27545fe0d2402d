"""A stand-in ``pynvml`` for the faults no machine here can show: an NVIDIA GPU whose driver
fails after NVML found it (a reset, ``NVML_ERROR_GPU_IS_LOST``, a timeout), and one whose driver
never tells a process's memory (``NVML_ERROR_NOT_SUPPORTED``, ``NVML_ERROR_NO_PERMISSION``)."""

from __future__ import annotations

import types
from collections.abc import Callable

#: nvidia-ml-py's codes for the two answers that never change on a machine.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_GPU_IS_LOST = 15


class NVMLError(Exception):
    """What nvidia-ml-py raises (its NVMLError, with the code as ``value``)."""

    def __init__(self, value: int = NVML_ERROR_GPU_IS_LOST) -> None:
        super().__init__(value)
        self.value = value


def fake_nvml(
    *, init_fails: bool = False, graphics_processes_error: int | None = None
) -> tuple[types.ModuleType, dict[str, bool]]:
    """A stand-in ``pynvml`` with one device, imported the way the adapter imports it. There
    is no GPU here, and a driver that fails mid-run cannot be made to: only that is faked.
    ``graphics_processes_error``: the code every graphics-process query fails with."""
    state = {"lost": False}
    nvml = types.ModuleType("pynvml")

    def init() -> None:
        if init_fails:
            raise NVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED

    def unless_lost(value: object) -> Callable[..., object]:
        def call(*args: object) -> object:
            if state["lost"]:
                raise NVMLError(NVML_ERROR_GPU_IS_LOST)
            return value

        return call

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = unless_lost(1)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = unless_lost("device 0")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = unless_lost([])  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetGraphicsRunningProcesses = unless_lost([])  # type: ignore[attr-defined]
    if graphics_processes_error is not None:
        code = graphics_processes_error

        def graphics_fails(*_args: object) -> object:
            raise NVMLError(code)

        nvml.nvmlDeviceGetGraphicsRunningProcesses = graphics_fails  # type: ignore[attr-defined]
    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED  # type: ignore[attr-defined]
    nvml.NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION  # type: ignore[attr-defined]
    return nvml, state
