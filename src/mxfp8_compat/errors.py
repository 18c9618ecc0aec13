"""Exceptions raised by mxfp8_compat."""

from __future__ import annotations

__all__ = ["MXFP8Unavailable"]


class MXFP8Unavailable(RuntimeError):
    """MXFP8 was required (``mode="native"`` or ``"emulated"``) but cannot run here.

    ``reasons`` holds one plain sentence per failed probe; the message lists them all.
    """

    def __init__(self, mode: str, reasons: tuple[str, ...]) -> None:
        self.mode = mode
        self.reasons = tuple(reasons)
        listed = "\n".join(f"  - {reason}" for reason in self.reasons) or "  - (no reason recorded)"
        super().__init__(f"MXFP8 mode {mode!r} is unavailable here:\n{listed}")
