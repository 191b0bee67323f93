"""The run folder's explanations from a language model: RUN/llm_explanations.jsonl, one JSON
object per line, appended as each latent is done (so a killed `saescope explain` loses at most the
latents in flight, and the next run goes on from there).

    {"latent": 12, "model": "SmolLM2-135M-Instruct", "url": "http://127.0.0.1:8080/v1/chat/completions",
     "prompt_version": 1, "status": "ok", "text": "the keyword def starting a function",
     "score": 0.8, "true_positives": 4, "false_negatives": 1, "true_negatives": 4, "false_positives": 1,
     "error": null, "seconds": 1.9, "created_at": "2026-12-06T10:42:00+00:00"}

`score` is the detection score: the balanced accuracy of the model's guesses, from the
explanation alone, of which held-out contexts make the latent fire (half of them do). A failed
latent has status "error", the message in `error`, and no text or score; the next run tries it
again. The latest line of a (latent, model, prompt_version) wins; a line cut short by a kill (the
last one, without its newline) is ignored.

`load_llm_explanations` reads the file (`RunFolderError` naming the line for anything else that is
not a record); `LlmExplanationWriter` appends to it, one writer at a time (an exclusive lock).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from trainer.errors import RunFolderError

LLM_EXPLANATIONS_FILE = "llm_explanations.jsonl"


@dataclass(frozen=True)
class LlmExplanation:
    """One latent's explanation by one model (or why there is none)."""

    latent: int
    model: str  # the name the server was asked for (--llm-model)
    url: str  # the chat-completions endpoint that answered (never a key)
    prompt_version: int  # trainer.llm_explain.PROMPT_VERSION when it was made
    status: str  # "ok" or "error"
    text: str | None = None
    score: float | None = None  # detection balanced accuracy, 0..1 (0.5 = chance)
    true_positives: int = 0  # contexts that fire, said to fire
    false_negatives: int = 0
    true_negatives: int = 0  # contexts that do not fire, said not to
    false_positives: int = 0
    error: str | None = None
    seconds: float = 0.0
    created_at: str = ""

    def __post_init__(self):
        if not self.created_at:
            object.__setattr__(self, "created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def n_scored(self) -> int:
        """Held-out contexts the explanation was scored on."""
        return self.true_positives + self.false_negatives + self.true_negatives + self.false_positives

    @property
    def key(self) -> tuple[int, str, int]:
        return self.latent, self.model, self.prompt_version

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "LlmExplanation":
        names = {f.name for f in fields(cls)}
        if not isinstance(obj, dict):
            raise RunFolderError(f"{where}: not an explanation record (a JSON object)")
        if missing := [name for name in ("latent", "model", "url", "prompt_version", "status") if name not in obj]:
            raise RunFolderError(f"{where}: not an explanation record (no {', '.join(missing)})")
        record = cls(**{key: value for key, value in obj.items() if key in names})
        record.check(where)
        return record

    def check(self, where: str) -> None:
        counts = (self.true_positives, self.false_negatives, self.true_negatives, self.false_positives)
        problems = []
        if not (isinstance(self.latent, int) and self.latent >= 0):
            problems.append(f"latent {self.latent!r} is not an index")
        if not (isinstance(self.model, str) and isinstance(self.url, str) and isinstance(self.prompt_version, int)):
            problems.append("model and url are not text, or prompt_version is not a whole number")
        if self.status not in ("ok", "error"):
            problems.append(f"status {self.status!r} is neither ok nor error")
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            problems.append("the counts are not whole numbers >= 0")
        if self.ok and not (isinstance(self.text, str) and self.text.strip()):
            problems.append("an ok record without text")
        if self.ok and not (isinstance(self.score, (int, float)) and math.isfinite(self.score) and 0 <= self.score <= 1):
            problems.append(f"score {self.score!r} is not from 0 to 1")
        if problems:
            raise RunFolderError(f"{where}: {'; '.join(problems)}")


def balanced_accuracy(true_positives: int, false_negatives: int, true_negatives: int, false_positives: int) -> float:
    """(recall on the contexts that fire + recall on those that do not) / 2: 0.5 for guessing or
    for saying "fires" to everything, 1 for a perfect split."""
    positives, negatives = true_positives + false_negatives, true_negatives + false_positives
    if not positives or not negatives:
        raise ValueError("balanced accuracy needs contexts of both kinds")
    return (true_positives / positives + true_negatives / negatives) / 2


@dataclass
class LlmExplanations:
    """The file's records, the latest per (latent, model, prompt_version), in latent order."""

    records: list[LlmExplanation]

    @property
    def ok(self) -> list[LlmExplanation]:
        return [r for r in self.records if r.ok]

    @property
    def failed(self) -> list[LlmExplanation]:
        return [r for r in self.records if not r.ok]

    def done(self, model: str, prompt_version: int) -> set[int]:
        """Latents this model has explained with this prompt (failures are not done)."""
        return {r.latent for r in self.records if r.ok and r.model == model and r.prompt_version == prompt_version}


def llm_explanations_path(run_dir: Path) -> Path:
    return Path(run_dir) / LLM_EXPLANATIONS_FILE


def load_llm_explanations(run_dir: Path, n_latents: int | None = None) -> LlmExplanations:
    """The run's LLM explanations (none when the file is absent). A latent past `n_latents` is an
    error: the file belongs to another SAE."""
    path = llm_explanations_path(run_dir)
    if not path.exists():
        return LlmExplanations([])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read ({e.strerror})") from None
    latest: dict[tuple, LlmExplanation] = {}
    lines = data.split(b"\n")
    complete = lines if data.endswith(b"\n") else lines[:-1]  # the last one, cut short by a kill, is not a record
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunFolderError(f"{where}: not valid JSON") from None
        try:
            record = LlmExplanation.from_json(obj, where)
        except TypeError as e:  # a field of the wrong kind where a dataclass takes it
            raise RunFolderError(f"{where}: {e}") from None
        if n_latents is not None and record.latent >= n_latents:
            raise RunFolderError(f"{where}: latent {record.latent}, but the SAE has {n_latents} latents")
        latest[record.key] = record
    return LlmExplanations(sorted(latest.values(), key=lambda r: (r.latent, r.model, r.prompt_version)))


class LlmExplanationWriter:
    """Appends records to RUN/llm_explanations.jsonl, each line written whole and flushed to disk
    before the next; holds an exclusive lock while open, so two `saescope explain` of one run
    cannot interleave their lines."""

    def __init__(self, run_dir: Path):
        self.path = llm_explanations_path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> "LlmExplanationWriter":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{self.path}: another `saescope explain` is writing it; wait for it to finish") from None
        self._fd = fd
        self._drop_cut_line()
        return self

    def _drop_cut_line(self) -> None:
        """A record cut short by a kill (no newline at the end) would join the next line: cut it off."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        data = os.pread(self._fd, size, 0)
        os.ftruncate(self._fd, data.rfind(b"\n") + 1)

    def append(self, record: LlmExplanation) -> None:
        line = (record.to_json() + "\n").encode()
        written = 0
        while written < len(line):
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def drop_llm_explanations(run_dir: Path) -> None:
    """New weights make the explanations of the old ones stale."""
    llm_explanations_path(run_dir).unlink(missing_ok=True)
