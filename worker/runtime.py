"""What a worker process keeps between pipeline steps: the node's parts (worker.node), the model
and the decode processes.

The predictor (and torch's CUDA) is created lazily on the first inference, in the worker
process itself, never before a fork; the similar cases index likewise on the first draft.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dicom_node import metrics
from dicom_node.sender import ResultDestination
from worker import decoding
from worker.node import Node
from worker.pipeline import Context
from worker.settings import Settings

log = structlog.get_logger()


@dataclass
class Runtime:
    node: Node
    ctx: Context
    _predictor: object = None
    _decoder: Executor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        node = Node(settings)
        return cls(node=node, ctx=node.context())

    @property
    def settings(self) -> Settings:
        return self.node.settings

    def predictor(self):
        with self._lock:
            if self._predictor is None:
                from models.bundle import load_bundle
                from models.predictor import Predictor

                bundle = self.node.fetch_shared("bundle") or self.settings.bundle_path  # an S3 store's copy if need be
                self._predictor = Predictor(load_bundle(bundle, self.settings.model.operating_points),
                                            device=self.settings.model.device or None)
                device = self._predictor.device
                metrics.MODEL_LOADED.labels(model=metrics.model_label(self._predictor.bundle.digest),
                                            device=str(device)).set(1)
                if device.type == "cuda":
                    start_gpu_sampler(device)
            return self._predictor

    def decoder(self, processes: int) -> Executor:
        """The GPU worker's decode processes (worker.decoding), started once and kept; started
        again when a killed process broke the pool (its jobs were given back, see worker.failures)."""
        with self._lock:
            if self._decoder is None or getattr(self._decoder, "_broken", False):
                self._decoder = decoding.start(processes)
            return self._decoder

    def destination_for(self, calling_aet: str) -> ResultDestination:
        return self.node.destination_for(calling_aet)

    def send(self, files: list[Path], dest: ResultDestination) -> None:
        self.node.send(files, dest)  # a paused destination raises: the job waits


def sample_gpu(device) -> None:
    """Set the GPU gauges (dicom_node.metrics) from torch's allocator, and utilisation from NVML
    when nvidia-ml-py is installed. Only in the process that owns the device (the GPU worker)."""
    import torch

    label = str(device)
    metrics.GPU_MEMORY_ALLOCATED.labels(device=label).set(torch.cuda.memory_allocated(device))
    metrics.GPU_MEMORY_RESERVED.labels(device=label).set(torch.cuda.memory_reserved(device))
    metrics.GPU_MEMORY_PEAK.labels(device=label).set(torch.cuda.max_memory_allocated(device))
    metrics.GPU_MEMORY_TOTAL.labels(device=label).set(torch.cuda.get_device_properties(device).total_memory)
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        metrics.GPU_UTILIZATION.labels(device=label).set(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
    except pynvml.NVMLError as exc:
        log.warning("gpu.nvml_unavailable", error=str(exc))


def start_gpu_sampler(device, every_s: float = 5.0) -> threading.Thread:
    """Sample the GPU every ``every_s`` seconds in a daemon thread of the GPU worker."""
    def loop() -> None:
        while True:
            try:
                sample_gpu(device)
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                log.exception("gpu.sample_failed")
                return
            time.sleep(every_s)

    t = threading.Thread(target=loop, name="gpu-metrics", daemon=True)
    t.start()
    return t
