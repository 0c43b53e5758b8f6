"""The GPU worker's decode processes: spooled file -> decoded image resized for the encoder.

Decoding a radiograph costs more than its forward on a GPU, and the JPEG 2000 and JPEG decoders
hold the GIL, so the worker decodes in processes. They are spawned (never forked from a process
that may hold CUDA state), import no torch (models.preprocess resizes with Pillow, the same
numbers as the encoder's preprocessing), and end themselves when the worker dies.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pydicom

from models.preprocess import read_image, resize_for_model

PARENT_CHECK_S = 1.0


def model_input(path: str, size: int) -> np.ndarray:
    """A spooled image decoded (read_image) and resized to the encoder's input size."""
    return resize_for_model(read_image(pydicom.dcmread(path)), size)


def _init(parent: int) -> None:
    """A spawned process starts bare: the decoder switches first (dicom_node.config), then the watch."""
    from dicom_node.config import configure

    configure()
    _exit_with_parent(parent)


def _exit_with_parent(parent: int) -> None:
    """A SIGKILLed worker cannot stop its pool: each process watches for its parent to go."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start(processes: int) -> ProcessPoolExecutor:
    """`processes` decode processes for this worker."""
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init, initargs=(os.getpid(),))
