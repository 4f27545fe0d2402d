"""Will a model fit? Decided from its size before a byte is downloaded or a runtime started.

The bind layer measures the machine's headroom (available RAM, free VRAM) and hands it in; the
manifest gives the model's size and the resource ceilings. What the runtime needs is the model's
bytes plus an ``overhead_bytes`` allowance (context/KV cache, runtime code, buffers).

- Without GPU offload (or with no GPU: ``available_vram_bytes == 0``) the whole need must fit
  in RAM: ``model + overhead`` at most the available RAM and at most ``max_ram_bytes``.
- With GPU offload and a GPU present, the model's weights go to VRAM and the overhead stays in
  RAM: ``model`` at most the free VRAM and ``max_vram_bytes``; ``overhead`` at most the
  available RAM and ``max_ram_bytes``.

A need equal to its ceiling fits (as in :func:`evaluate_resource_limits`). Byte counts are
exact ``int``s (not ``bool``); the model size is > 0, the others >= 0.
"""

from __future__ import annotations

from typing import Final

from companion_runtime.core._reasons import Reason
from companion_runtime.core._resources import ResourceLimits, _limits_valid
from companion_runtime.core._verdict import ALLOW, Verdict, deny

__all__ = ["evaluate_model_fit"]

_MODEL_TOO_LARGE: Final = deny(Reason.MODEL_TOO_LARGE)
_MALFORMED_SPEC: Final = deny(Reason.MALFORMED_SPEC)
_MALFORMED_LIMITS: Final = deny(Reason.MALFORMED_LIMITS)


def _byte_count(value: object, *, minimum: int) -> bool:
    return type(value) is int and value >= minimum


def _fit(
    model_size_bytes: object,
    overhead_bytes: object,
    available_ram_bytes: object,
    available_vram_bytes: object,
    resource_limits: object,
    gpu_offload: object,
) -> Verdict:
    if type(resource_limits) is not ResourceLimits:
        return _MALFORMED_LIMITS
    max_ram = resource_limits.max_ram_bytes
    max_vram = resource_limits.max_vram_bytes
    if not _limits_valid(max_ram, max_vram, resource_limits.max_cpu_percent):
        return _MALFORMED_LIMITS
    if not (
        _byte_count(model_size_bytes, minimum=1)
        and _byte_count(overhead_bytes, minimum=0)
        and _byte_count(available_ram_bytes, minimum=0)
        and _byte_count(available_vram_bytes, minimum=0)
        and type(gpu_offload) is bool
    ):
        return _MALFORMED_SPEC
    # Checked above: every count is a non-negative int.
    model: int = model_size_bytes  # type: ignore[assignment]
    overhead: int = overhead_bytes  # type: ignore[assignment]
    ram: int = available_ram_bytes  # type: ignore[assignment]
    vram: int = available_vram_bytes  # type: ignore[assignment]
    if gpu_offload and vram > 0:
        in_vram, in_ram = model, overhead
        if in_vram > vram or in_vram > max_vram:
            return _MODEL_TOO_LARGE
    else:
        in_ram = model + overhead
    if in_ram > ram or in_ram > max_ram:
        return _MODEL_TOO_LARGE
    return ALLOW


def evaluate_model_fit(
    *,
    model_size_bytes: int,
    overhead_bytes: int,
    available_ram_bytes: int,
    available_vram_bytes: int,
    resource_limits: ResourceLimits,
    gpu_offload: bool = False,
) -> Verdict:
    """Can a model of ``model_size_bytes`` run within the headroom and the ceilings? Never raises.

    Order: ``resource_limits`` (``malformed_limits``), the byte counts and ``gpu_offload``
    (``malformed_spec``), then the fit (``model_too_large``); rules in the module docstring.
    """
    try:
        return _fit(
            model_size_bytes,
            overhead_bytes,
            available_ram_bytes,
            available_vram_bytes,
            resource_limits,
            gpu_offload,
        )
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        # Only a ResourceLimits forged with object.__new__ (unset slots) gets here.
        return _MALFORMED_LIMITS
