"""Checkpoints every worker host can reach: a copy of each trial's checkpoints in an Optuna
artifact store (a folder, or an S3-compatible bucket).

The trainer keeps writing its checkpoints to the worker's local ``--checkpoint-dir`` (fast, and
flushed before they replace the old one); after every epoch that wrote one, and after a stop, the
objective copies it here. A trial, before it trains, takes its datasets' checkpoints from here
into its local folder, so a retry on another host resumes where the lost one stopped instead of
at epoch 0.

Why an artifact store rather than asking for a shared ``--checkpoint-dir``: preemptible and
rented GPU hosts seldom share a file system, but they reach an object store (S3, MinIO, R2) as
easily as the database; a folder store serves the hosts that do share one (NFS), with the same
code. Optuna's stores write an object in one piece on S3 but not on a file system, so a
dataset's checkpoint goes to two slots in turn, ``a`` and ``b``, and a small ``latest`` object
names the slot last completed: a worker killed mid-copy leaves the other slot whole. Restoring
puts the latest slot as ``checkpoint.pt`` and the other as ``checkpoint.prev.pt``, where the
trainer falls back to it if the latest is damaged.

Objects are ``<study>/trial-<n>/<dataset>/{a,b,latest}``, ``n`` the original trial of a retry
chain, as for the local folder.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from nkat_search.atomic import atomic_path
from nkat_search.errors import UserError

SLOTS = ("a", "b")
LATEST = "latest"


class CheckpointStore:
    """``CheckpointStore(url)``: a folder path, ``file:///path`` or ``s3://bucket[/prefix]``
    (credentials and endpoint the way boto3 reads them: ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible stores)."""

    def __init__(self, url: str):
        self.url = url
        self.prefix = ""
        self._folder: Path | None = None
        if url.startswith("s3://"):
            bucket, _, prefix = url[len("s3://"):].partition("/")
            if not bucket:
                raise UserError(f"--checkpoint-store {url}: no bucket named (s3://BUCKET/PREFIX)")
            try:  # boto3 is optional: only an S3 store needs it
                from optuna.artifacts import Boto3ArtifactStore

                self.store = Boto3ArtifactStore(bucket)
            except ImportError:
                raise UserError(f"--checkpoint-store {url}: an S3 store needs boto3 "
                                "(pip install boto3)") from None
            self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        else:
            if "://" in url and not url.startswith("file://"):
                raise UserError(f"--checkpoint-store {url}: expected a folder, file:///PATH or "
                                "s3://BUCKET/PREFIX")
            self._folder = Path(url[len("file://"):] if url.startswith("file://") else url)
            self.store = FileSystemArtifactStore(self._folder)

    def check(self) -> None:
        """The store takes an object and gives it back: one line (exit 2) if not."""
        probe = f"{self.prefix}.probe-{os.getpid()}"
        try:
            if self._folder is not None:
                self._folder.mkdir(parents=True, exist_ok=True)
            self.store.write(probe, io.BytesIO(b"ok"))
            with self.store.open_reader(probe) as reader:
                assert reader.read() == b"ok"
            self.store.remove(probe)
        except Exception as err:  # noqa: BLE001 - any failure means: not usable
            first = " ".join(str(err).split())[:200] or type(err).__name__
            raise UserError(f"--checkpoint-store {self.url}: cannot write there ({first})") from None

    def _id(self, study: str, trial_number: int, dataset: str, name: str) -> str:
        return f"{self.prefix}{study}/trial-{trial_number}/{dataset}/{name}"

    def _write(self, artifact_id: str, body) -> None:
        if self._folder is not None:
            (self._folder / artifact_id).parent.mkdir(parents=True, exist_ok=True)
        self.store.write(artifact_id, body)

    def _read(self, artifact_id: str) -> bytes | None:
        try:
            with self.store.open_reader(artifact_id) as reader:
                return reader.read()
        except ArtifactNotFound:
            return None

    def _latest(self, study: str, n: int, dataset: str) -> str | None:
        name = self._read(self._id(study, n, dataset, LATEST))
        name = name.decode("ascii", "replace").strip() if name is not None else None
        return name if name in SLOTS else None

    def upload(self, study: str, n: int, dataset: str, checkpoint: Path) -> None:
        """Copy ``checkpoint`` into the slot not named latest, then name it latest."""
        slot = "b" if self._latest(study, n, dataset) == "a" else "a"
        with open(checkpoint, "rb") as body:
            self._write(self._id(study, n, dataset, slot), body)
        self._write(self._id(study, n, dataset, LATEST), io.BytesIO(slot.encode()))

    def restore(self, study: str, n: int, dataset: str, folder: Path, name: str,
                previous: str) -> bool:
        """The store's checkpoints of a dataset into ``folder`` (``name``, and ``previous`` for
        the other slot); False when the store has none (the local files are left alone)."""
        latest = self._latest(study, n, dataset)
        order = [latest, *[s for s in SLOTS if s != latest]] if latest else list(SLOTS)
        found = [(slot, self._read(self._id(study, n, dataset, slot))) for slot in order]
        found = [(slot, body) for slot, body in found if body]
        if not found:
            return False
        folder.mkdir(parents=True, exist_ok=True)
        for (_, body), target in zip(found, (name, previous)):
            with atomic_path(folder / target) as tmp:
                Path(tmp).write_bytes(body)
        if len(found) == 1:
            (folder / previous).unlink(missing_ok=True)
        return True

    def remove(self, study: str, n: int, datasets) -> None:
        """Forget a finished trial's checkpoints."""
        for dataset in datasets:
            for name in (*SLOTS, LATEST):
                try:
                    self.store.remove(self._id(study, n, dataset, name))
                except ArtifactNotFound:
                    pass
