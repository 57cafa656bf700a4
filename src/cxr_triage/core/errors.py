"""Typed errors shared by the readers: a reason a user can act on, never a traceback."""

from __future__ import annotations

from typing import Literal

from cxr_triage.core import limits

ReadErrorKind = Literal["missing", "not_a_file", "denied", "empty", "too_large", "unsupported", "corrupt"]


class ImageReadError(ValueError):
    """The input cannot be turned into a grey image; the message says why and what to do.

    ``kind`` sorts the reason: ``missing`` (no such path, dangling link), ``not_a_file`` (a folder, FIFO, device or
    symbolic-link loop), ``denied`` (no read permission), ``empty``, ``too_large`` (over a size or pixel limit),
    ``unsupported`` (a valid file this tool does not read: animation, multi-frame, a compression without decoder)
    and ``corrupt`` (anything else).
    """

    def __init__(self, message: str, kind: ReadErrorKind = "corrupt") -> None:
        super().__init__(message)
        self.kind: ReadErrorKind = kind


def over_budget(label: str, width: int, height: int, frames: int = 1) -> ImageReadError:
    """The error for an image over ``limits.MAX_PIXELS``, known from its header (any reader: Pillow or DICOM)."""
    return ImageReadError(
        f"{label}: image is {width}x{height} pixels{f' x {frames} frames' if frames > 1 else ''}, over the "
        f"{limits.MAX_PIXELS:,}-pixel limit; downscale it first",
        "too_large",
    )
