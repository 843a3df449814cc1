"""Muting what native decoders (libjpeg, libpng, OpenCV) and Pillow print on stderr, for command-line tools.

Decoding problems are reported as ``ImageError`` anyway; the native lines ("Corrupt JPEG data: ...",
"libpng error: ...", "[ERROR:0] ... imdecode_") and Pillow's warnings about corrupt EXIF blocks would
break a one-line error contract. Muting is opt-in and process-wide: while any decode runs, file
descriptor 2 points at /dev/null, so other threads' stderr output in that window is lost.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

import cv2

_MUTE = {"enabled": False, "depth": 0, "saved_fd": -1, "log_level": None}
_MUTE_LOCK = threading.Lock()


def silence_native_decoder_messages(silent: bool = True) -> None:
    """Opt in (CLI tools) to hiding what decoders print on stderr while decoding; off by default."""
    _MUTE["enabled"] = bool(silent)


@contextlib.contextmanager
def decoder_messages_silenced():
    """``with decoder_messages_silenced(): ...`` — :func:`silence_native_decoder_messages` for a block."""
    previous = _MUTE["enabled"]
    _MUTE["enabled"] = True
    try:
        yield
    finally:
        _MUTE["enabled"] = previous


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or odd sys.stderr must not break decoding
        pass


@contextlib.contextmanager
def native_messages_muted():
    """Around one decode: stderr goes to /dev/null while muting is enabled (else this does nothing)."""
    if not _MUTE["enabled"]:
        yield
        return
    with _MUTE_LOCK:  # reference-counted, so concurrent decodes restore stderr exactly once
        if _MUTE["depth"] == 0:
            _flush_stderr()
            _MUTE["saved_fd"] = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            _MUTE["log_level"] = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _MUTE["depth"] += 1
    try:
        yield
    finally:
        with _MUTE_LOCK:
            _MUTE["depth"] -= 1
            if _MUTE["depth"] == 0:
                _flush_stderr()  # what Python wrote while muted goes to /dev/null, not after
                os.dup2(_MUTE["saved_fd"], 2)
                os.close(_MUTE["saved_fd"])
                cv2.utils.logging.setLogLevel(_MUTE["log_level"])


__all__ = ["silence_native_decoder_messages", "decoder_messages_silenced", "native_messages_muted"]
