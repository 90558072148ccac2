"""Where a training stage keeps its checkpoints between epochs: one folder per resume key, mirrored to S3.

`<out>/checkpoints/<key>/` holds last.pt, best.pt and the id of the MLflow run that wrote them. `key` hashes every
knob and input the run depends on, so the same stage on the same inputs resumes where a crash stopped it and
anything else starts afresh (the folders of other keys are pruned). With `storage.checkpoints` set, best.pt and
last.pt are copied to `<storage.checkpoints>/<stage>/<key>/` after every epoch and fetched back when this machine
has no last.pt: a retry on a fresh machine resumes too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from action3d.checkpoint import BEST, LAST, epochs_done
from action3d.progress import say

RUN_ID = "mlflow_run_id"


class CheckpointStore:
    def __init__(self, out_dir: str | Path, key: str, *, stage: str, mirror: str | None = None, s3=None):
        self.root = Path(out_dir) / "checkpoints"
        self.folder = self.root / key
        self.stage = stage
        self.remote = f"{mirror.rstrip('/')}/{stage}/{key}/" if mirror else None
        self.s3 = s3  # an action3d.storage.S3Config, when mirrored

    @property
    def last(self) -> Path:
        return self.folder / LAST

    def prepare(self) -> None:
        """Prune the folders of other keys, then fetch the mirror's checkpoints when this folder has none."""
        for stale in self.root.glob("*"):
            if stale != self.folder:
                shutil.rmtree(stale, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.remote and not self.last.is_file():
            self._restore()

    def _restore(self) -> None:
        from action3d.storage import download, list_objects

        held = {key.rsplit("/", 1)[-1] for key in list_objects(self.remote, config=self.s3)}
        if LAST not in held:
            return
        # each download lands whole (a temporary name, then a rename); last.pt comes last, so a restore cut short
        # leaves no last.pt, never a last.pt without its best.pt
        for name in (BEST, LAST):
            if name in held:
                download(self.remote + name, self.folder / name, config=self.s3)
        say(f"[{self.stage}] restored epoch {epochs_done(self.last)} from {self.remote}")

    def mirror(self) -> None:
        """Copy best.pt, then last.pt, to the mirror (nothing without one): a copy cut short between the two leaves a
        last.pt no newer than its best.pt."""
        if not self.remote:
            return
        from action3d.storage import upload

        for name in (BEST, LAST):
            if (self.folder / name).is_file():
                upload(self.folder / name, self.remote + name, config=self.s3)

    def previous_run(self) -> str | None:
        """The MLflow run that wrote these checkpoints, when a run did."""
        path = self.folder / RUN_ID
        return path.read_text().strip() or None if path.is_file() else None

    def record_run(self, run_id: str) -> None:
        (self.folder / RUN_ID).write_text(run_id)
