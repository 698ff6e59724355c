"""What a run leaves in its workdir: JSON records, metrics, PNGs.

Every path here may be local or a URL (``gs://bucket/run``, with the `gcp`
extra installed): file access goes through `etils.epath` (the path library
Orbax uses), TensorBoard events through tensorboardX (no TensorFlow needed;
gs:// through google-cloud-storage), and, when `config.writer.wandb` names a
project, to Weights & Biases through its own library (`WandbLogger`).
Metrics are written by process 0 only.
"""

from __future__ import annotations

import io
import json
import secrets
import tempfile
import os
import time

import jax
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter


def is_remote(path) -> bool:
    """True for URLs such as gs://bucket/x (no local file system semantics)."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute (user folder expanded); URLs unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def make_workdir(workdir: str) -> None:
    """Creates a run's workdir (and its parents).

    Raises:
      RuntimeError: it cannot be created (a read-only disk, no permission, a
        full disk), naming it and what to check: the same message a
        read-only existing workdir gets from `WorkdirLock`.
    """
    try:
        makedirs(workdir)
    except OSError as e:
        raise RuntimeError(f"cannot create the workdir {workdir} ({e}): is the "
                           "disk writable (and not full), or pass another "
                           "--workdir.") from None


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file (its parent folders created), atomically where the
    file system can rename (a temporary file renamed into place); on object
    stores a single object upload, which is atomic by itself."""
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        p.write_bytes(data)
        return
    # A temporary name of its own: processes writing the same file at once
    # (harness invocations sharing OUT) must not rename each other's.
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented JSON atomically (see `write_bytes`), so a
    killed run never leaves a half-written file."""
    write_bytes(path, json.dumps(obj, indent=1).encode())


def read_json(path: str):
    """The JSON object in `path`, or None if there is no such file."""
    p = epath.Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def save_png(path: str, image) -> None:
    """Saves uint8 [H, W, 3] (or [H, W]) as a PNG via PIL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


WANDB_MODES = ("offline", "online")
WANDB_RUN_FILE = "wandb_run.json"


def wandb_options(config) -> dict | None:
    """`WandbLogger`'s options from `config.writer` (None: W&B is off)."""
    w = config.get("writer")
    if w is None or not w.get("wandb"):
        return None
    return {"project": w.wandb, "entity": w.get("wandb_entity", "") or None,
            "mode": w.get("wandb_mode", "offline"),
            "name": w.get("wandb_name", "") or None}


class WandbLogger:
    """Weights & Biases run of a workdir (process 0): scalars, images and
    text as `wandb.log` entries at the run's steps, the config as the run's
    config.

    Args:
      workdir: the run's workdir: W&B's files go to WORKDIR/wandb (a local
        temporary folder for a gs:// workdir), so `mode='offline'` needs no
        network (`wandb sync WORKDIR/wandb/offline-run-*` uploads later), and
        WORKDIR/wandb_run.json keeps the run id: online, a resumed run
        continues the same W&B run; offline, W&B does not resume, so every
        invocation writes its own offline-run folder under that id.
      project, entity, name: W&B's (name default: the workdir's folder name).
      mode: 'offline' | 'online' (`WANDB_MODES`).
      config: the run's config as a dict.

    W&B keeps one value per key and step, in increasing steps: after a resume
    the steps the killed run had already logged (and a bit-exact resume
    recomputes) keep their first values.

    Raises:
      ImportError: the `wandb` package is missing (named, with the install
        command).
    """

    def __init__(self, workdir: str, *, project: str, entity: str | None = None,
                 name: str | None = None, mode: str = "offline",
                 config: dict | None = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                f"config.writer.wandb={project!r} needs the wandb package: pip "
                "install 'ddep_jax[wandb]' (or wandb), or leave writer.wandb "
                "empty.") from e
        self._wandb = wandb
        record_path = os.path.join(workdir, WANDB_RUN_FILE)
        record = read_json(record_path)
        if record is None:
            record = {"id": secrets.token_hex(4), "project": project}  # W&B: [a-z0-9]
            write_json(record_path, record)
        self.run_id = record["id"]
        files = workdir  # W&B writes its files locally, whatever the workdir
        if is_remote(workdir):
            import tempfile

            files = os.path.join(tempfile.gettempdir(), "ddep_jax_wandb", self.run_id)
            os.makedirs(files, exist_ok=True)
        self.run = wandb.init(
            project=project, entity=entity,
            name=name or os.path.basename(os.path.normpath(workdir)),
            id=self.run_id, resume="allow", dir=files, mode=mode,
            config=config or {}, settings=wandb.Settings(silent=True))

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=int(step))

    def image(self, step: int, name: str, image) -> None:
        self.log(step, {name: self._wandb.Image(np.asarray(image))})

    def text(self, step: int, name: str, text: str) -> None:
        self.log(step, {name: self._wandb.Html(text)})

    def close(self) -> None:
        self.run.finish()


class MetricWriter:
    """Appends {'step': s, **scalars} lines to WORKDIR/metrics.jsonl and the same
    scalars to TensorBoard events under WORKDIR/tensorboard, and to W&B with
    `wandb` options (`wandb_options`; `WandbLogger`). No-op on hosts other
    than process 0.

    Object stores (gs://) cannot append: there the JSONL lines of the run so
    far (the earlier ones read back on resume) are rewritten as one object at
    most every `remote_flush_seconds` and at `close`.
    """

    def __init__(self, workdir: str, remote_flush_seconds: float = 60.0,
                 resume_step: int | None = None, wandb: dict | None = None,
                 config: dict | None = None):
        """`resume_step`: the step a resumed run restarted from; lines of later
        steps (written before the run was killed, and about to be redone)
        are cut from metrics.jsonl, so that every step appears once.
        `wandb`: `WandbLogger` options (None: no W&B); `config` its run config."""
        self.active = jax.process_index() == 0
        self._wandb = None
        if not self.active:
            return
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._remote = is_remote(workdir)
        self._flush_every = remote_flush_seconds
        p = epath.Path(self._path)
        lines = p.read_text().splitlines(keepends=True) if p.exists() else []
        if resume_step is not None:
            kept = [l for l in lines if json.loads(l).get("step", 0) <= resume_step]
            if len(kept) != len(lines):
                lines = kept
                write_bytes(self._path, "".join(lines).encode())
        if self._remote:
            self._lines = lines
            self._flushed = time.monotonic()
        else:
            self._jsonl = open(self._path, "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb:
            self._wandb = WandbLogger(workdir, config=config, **wandb)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": int(step), **scalars}) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._flushed > self._flush_every:
                self._flush_remote()
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        if self._wandb:
            self._wandb.log(step, scalars)

    def write_image(self, step: int, name: str, image) -> None:
        """A uint8 [H, W, 3] image to TensorBoard (its Images tab)."""
        if self.active:
            self._tb.add_image(name, np.asarray(image), int(step), dataformats="HWC")
            if self._wandb:
                self._wandb.image(step, name, image)

    def write_text(self, step: int, name: str, text: str) -> None:
        """Text to TensorBoard (its Text tab), e.g. the run's config."""
        if self.active:
            self._tb.add_text(name, text, int(step))
            if self._wandb and name != "config":  # W&B has it as the run's config
                self._wandb.text(step, name, text)

    def _flush_remote(self) -> None:
        write_bytes(self._path, "".join(self._lines).encode())
        self._flushed = time.monotonic()

    def close(self) -> None:
        """Flushes and closes; later calls do nothing."""
        if not self.active:
            return
        if self._remote:
            self._flush_remote()
        else:
            self._jsonl.close()
        self._tb.close()
        if self._wandb:
            self._wandb.close()
        self.active = False


class WorkdirLock:
    """WORKDIR/run.lock, held while a run works in its workdir (process 0;
    local file systems): a second run on the same workdir is refused with the
    owner's host and pid. The lock is an `fcntl.flock` on the file, which the
    operating system releases when the owner dies, so a lock left by a killed
    run is stale and simply taken over. Object stores (gs://) have no locks:
    there it does nothing.

    Raises (on `acquire`):
      RuntimeError: another live process holds the lock, naming it; or the
        lock file cannot be written (a read-only workdir, a full disk).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(absolute(workdir), "run.lock")
        self._file = None

    def acquire(self) -> "WorkdirLock":
        import fcntl
        import socket

        if is_remote(self.path) or jax.process_index() != 0:
            return self
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise RuntimeError(f"cannot write the lock file {self.path} ({e}): is "
                               "the workdir writable (and the disk not full)?") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise RuntimeError(
                f"workdir {os.path.dirname(self.path)} is in use by another run "
                f"({owner}; lock {self.path}): wait for it or stop it, or use "
                "another --workdir.") from None
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
