"""Positional reads straight into numpy buffers (the dense loader's and the expert store's)."""

from __future__ import annotations

import os

import numpy as np


def pread_into(fd: int, buf: np.ndarray, offset: int = 0) -> int:
    """Fill the C-contiguous ``buf`` from ``fd`` at ``offset``; returns the bytes read, which are fewer
    than ``buf.nbytes`` only at the end of the file (the caller turns that into an error)."""
    view = buf.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(view):  # a regular file returns less than asked only at EOF (or on a signal)
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done
