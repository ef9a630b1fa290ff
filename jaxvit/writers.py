"""TensorBoard scalars through tensorboardX. (clu's metric_writers package imports TensorFlow, which
jaxvit does not depend on; this keeps clu's `write_scalars(step, dict)` interface.)"""
from __future__ import annotations

from pathlib import Path


class TensorBoardWriter:
    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(str(logdir))

    def write_scalars(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self._writer.add_scalar(k, float(v), global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()


class NullWriter:
    def write_scalars(self, step: int, scalars: dict) -> None:
        pass

    def flush(self) -> None:
        pass


def create_writer(workdir: str | Path, is_main: bool):
    """Process 0 writes `<workdir>/tensorboard`; other processes write nothing."""
    return TensorBoardWriter(Path(workdir) / "tensorboard") if is_main else NullWriter()
