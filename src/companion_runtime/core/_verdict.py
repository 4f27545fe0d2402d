"""Verdicts and the one exception the core raises.

A decision is a value: a :class:`Verdict` that says whether the action may go ahead and, when
it may not, which :class:`Reason` stopped it. Decisions that are taken millions of times a
second hand out prebuilt verdicts (``ALLOW`` and one denial per reason) instead of building a
new object each time; :func:`deny` looks the prebuilt denial up.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import final

from companion_runtime.core._reasons import Reason

__all__ = ["ALLOW", "SpecError", "Verdict", "deny"]

_REASONS_BY_VALUE: MappingProxyType[str, Reason] = MappingProxyType(
    {reason.value: reason for reason in Reason}
)


@final
class SpecError(ValueError):
    """A constructor or ``record_*`` call was given values it cannot accept.

    The message is the reason code alone (``str(error) == "malformed_spec"``); it never
    carries the offending value, so it is safe to log. The code is also on ``.reason``.
    """

    reason: Reason

    def __init__(self, reason: Reason) -> None:
        # Never echo a value that is not a reason code: it could be the caller's input.
        self.reason = Reason.MALFORMED_SPEC
        if type(reason) is Reason or type(reason) is str:
            self.reason = _REASONS_BY_VALUE.get(reason, Reason.MALFORMED_SPEC)
        super().__init__(self.reason.value)


@final
@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one decision: ``ok`` and the ``reason`` behind it.

    A denial is never truthy, so ``if verdict:`` cannot mistake a refusal for consent.
    ``ok`` is true exactly when ``reason`` is :attr:`Reason.OK`; anything else is refused at
    construction with :class:`SpecError`.
    """

    #: Whether the action may go ahead.
    ok: bool
    #: Why; :attr:`Reason.OK` when ``ok``.
    reason: Reason

    def __post_init__(self) -> None:
        if type(self.ok) is not bool or type(self.reason) is not Reason:
            raise SpecError(Reason.MALFORMED_SPEC)
        if self.ok is not (self.reason is Reason.OK):
            raise SpecError(Reason.MALFORMED_SPEC)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, bool | str]:
        """Return exactly ``{"ok": bool, "reason": str}`` (the wire shape)."""
        return {"ok": self.ok, "reason": self.reason.value}


#: The one verdict every allowed decision returns.
ALLOW = Verdict(True, Reason.OK)

_DENIALS: MappingProxyType[Reason, Verdict] = MappingProxyType(
    {reason: Verdict(False, reason) for reason in Reason if reason is not Reason.OK}
)


def deny(reason: Reason) -> Verdict:
    """Return the prebuilt denial for ``reason``.

    Raises :class:`SpecError` (``malformed_spec``) if ``reason`` is not a denial reason.
    """
    if type(reason) is not Reason or reason is Reason.OK:
        raise SpecError(Reason.MALFORMED_SPEC)
    return _DENIALS[reason]
