"""TensorBoard logging of a run: what the loop writes to ``metrics.jsonl``, as TensorBoard scalars.

On by default when the ``tensorboard`` package is importable (``pip install -e ".[tensorboard]"``),
off with ``run.tensorboard=false``. Event files go to ``runs/<name>/tb/``, one sub-folder per
stage (``tb/pretrain-mae``, ``tb/cells/mae-full-f0.1-s0``, ``tb/finetune``), so TensorBoard
shows each stage as its own run:

    tensorboard --logdir runs/<name>/tb        (or --logdir runs/ for every run)

Logged: the epoch records (``train/loss``, ``train/lr``, ``train/epoch_time_s``,
``train/images_per_s``, ``val/<metric>`` ...; x axis: optimizer steps), the reconstruction grids
of masked-modelling pretraining (the same PNGs as ``recon/``), and the resolved config as text.
Only rank 0 writes (under DDP the other ranks get no tracker). A resumed stage purges the events
it logs again (TensorBoard's ``purge_step``), as ``metrics.jsonl`` drops its records past the
checkpoint. At most a few event writers are open at once: a study's cells run one after the other.
"""

from __future__ import annotations

import atexit
import functools
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

TB_DIR = "tb"
_MAX_OPEN = 4
_open: "OrderedDict[Path, Any]" = OrderedDict()  # logdir -> SummaryWriter, least recently used first


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken install: logging is simply off
        return False
    return True


def _close(logdir: Path) -> None:
    writer = _open.pop(logdir, None)
    if writer is not None:
        writer.close()


@atexit.register
def close_all() -> None:
    """Flush and close every open event writer (also at interpreter exit)."""
    for logdir in list(_open):
        _close(logdir)


def _never_fatal(fn):
    """A TensorBoard failure (a broken install, a full disk) costs the event files, never the run:
    one line on stderr, then this tracker stays silent."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.failed = True
            print(f"[tensorboard] logging to {self.logdir} stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
    return wrapper


class Tracker:
    """TensorBoard event writer of one run folder (``logdir``); :meth:`child` gives a stage's."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.last_step = 0
        self._started = False
        self.failed = False

    def child(self, name: str) -> "Tracker":
        return Tracker(self.logdir / name)

    def _writer(self, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        w = _open.get(self.logdir)
        if w is None:
            # the first event of this process purges what an earlier, cut-off run logged from here on
            w = SummaryWriter(str(self.logdir), purge_step=None if self._started else first_step)
            self._started = True
            _open[self.logdir] = w
            while len(_open) > _MAX_OPEN:
                _close(next(iter(_open)))
        _open.move_to_end(self.logdir)
        return w

    @_never_fatal
    def log_metrics(self, record: dict[str, Any], extra: dict[str, float] | None = None) -> None:
        """One epoch record of the loop: numeric fields as scalars at its optimizer ``step``.
        ``train_loss`` -> ``train/loss``, ``lr`` -> ``train/lr``, ``val_<m>`` -> ``val/<m>``, others
        under ``train/``; ``extra`` (e.g. throughput) is logged beside, not stored in metrics.jsonl."""
        step = int(record.get("step", record.get("epoch", 0)) or 0)
        self.last_step = step
        w = self._writer(step)
        for key, value in {**record, **(extra or {})}.items():
            if key in ("epoch", "step", "stage") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            if key.startswith("val_"):
                tag = f"val/{key[4:]}"
            elif key == "best":
                tag = "val/best"
            else:
                tag = f"train/{key.removeprefix('train_')}"
            w.add_scalar(tag, float(value), step)
        w.add_scalar("train/epoch", float(record.get("epoch", 0)) + 1, step)
        w.flush()

    @_never_fatal
    def log_image(self, tag: str, image: str | Path | Any, step: int | None = None) -> None:
        """A PNG file (or an (H, W[, C]) array in [0, 1] / uint8) at ``step`` (default: the last
        logged step)."""
        import numpy as np

        if isinstance(image, (str, Path)):
            from PIL import Image

            with Image.open(image) as im:
                arr = np.asarray(im.convert("RGB"))
        else:
            arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        step = self.last_step if step is None else int(step)
        w = self._writer(step)
        w.add_image(tag, arr, step, dataformats="HWC")
        w.flush()

    @_never_fatal
    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Text (shown as markdown; wrapped in a code block so that YAML keeps its layout)."""
        w = self._writer(step)
        w.add_text(tag, "```\n" + text + "\n```", step)
        w.flush()

    def close(self) -> None:
        _close(self.logdir)


def make_tracker(cfg, run_path: str | Path) -> Tracker | None:
    """The run's tracker (``<run>/tb``), with the resolved config logged as text; None when
    ``run.tensorboard`` is false, the package is missing, or this is not rank 0."""
    from medmim.train.distributed import current

    if not getattr(cfg.run, "tensorboard", True) or not current().is_main or not tensorboard_available():
        return None
    from medmim.config import dump_config

    tracker = Tracker(Path(run_path) / TB_DIR)
    tracker.log_text("config", dump_config(cfg))
    return tracker
