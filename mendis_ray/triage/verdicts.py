"""Verdicts on outliers: ``interesting``, ``artefact`` or ``normal``, one per spectrum id.

Stored as ``verdicts.parquet`` in the scored catalog folder (:data:`VERDICTS_FILE`),
columns ``id`` (string), ``verdict`` (string), ``note`` (string, may be empty) and
``updated`` (ISO 8601 UTC string).  Every write takes an exclusive lock on
``verdicts.parquet.lock`` (so concurrent Serve replicas on one machine never lose each
other's verdicts), reads the current file, applies the change and replaces the file
atomically (temporary name, then rename).

The static triage page (a ``file://`` page cannot write files) offers its verdicts as a
download, ``verdicts.json`` (``{"format": "mendis-verdicts-1", "verdicts": [...]}``);
``mendis score ... --verdicts verdicts.json`` merges such a file into the folder's
``verdicts.parquet`` (the newer ``updated`` wins per id) and carries the verdicts into its
outputs.  :func:`read_verdicts` reads either format and validates every row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.atomic import write_atomic

__all__ = [
    "JSON_FORMAT",
    "VERDICTS",
    "VERDICTS_FILE",
    "VerdictError",
    "merge_verdicts",
    "read_verdicts",
    "record_verdict",
    "validate_verdict",
    "write_verdicts",
]

VERDICTS = ("interesting", "artefact", "normal")
#: A verdict that removes the spectrum's verdict (a click on the active button).
UNSET = "unset"
VERDICTS_FILE = "verdicts.parquet"
JSON_FORMAT = "mendis-verdicts-1"
MAX_ID = 256
MAX_NOTE = 2000
SCHEMA = pa.schema([("id", pa.string()), ("verdict", pa.string()), ("note", pa.string()),
                    ("updated", pa.string())])  # fmt: skip


class VerdictError(ValueError):
    """An invalid verdict; ``field`` names the bad field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def validate_verdict(
    obj: object, known_ids: Iterable[str] | None = None, *, allow_unset: bool = False
) -> dict:
    """A clean ``{"id", "verdict", "note", "updated"}`` from untrusted input (a JSON object).

    Raises:
        VerdictError naming the field: not an object, unknown keys, id not a non-empty
        string of at most 256 characters (or not one of ``known_ids``), verdict not one of
        :data:`VERDICTS` (or ``unset`` when allowed), note not a string of at most 2000
        characters, updated not an ISO 8601 time."""
    if not isinstance(obj, Mapping):
        raise VerdictError("body", "expected a JSON object")
    extra = sorted(set(obj) - {"id", "verdict", "note", "updated"})
    if extra:
        raise VerdictError(str(extra[0])[:40], "unknown field")
    sid = obj.get("id")
    if not isinstance(sid, str) or not 0 < len(sid) <= MAX_ID:
        raise VerdictError("id", f"must be a non-empty string of at most {MAX_ID} characters")
    if known_ids is not None and sid not in known_ids:
        raise VerdictError("id", "not a spectrum of this catalog's triage list")
    verdict = obj.get("verdict")
    allowed = (*VERDICTS, UNSET) if allow_unset else VERDICTS
    if verdict not in allowed:
        raise VerdictError("verdict", f"must be one of {', '.join(allowed)}")
    note = obj.get("note", "")
    if note is None:
        note = ""
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise VerdictError("note", f"must be a string of at most {MAX_NOTE} characters")
    updated = obj.get("updated") or _now()
    try:
        datetime.fromisoformat(str(updated).replace("Z", "+00:00"))
    except ValueError:
        raise VerdictError("updated", "must be an ISO 8601 time") from None
    return {"id": sid, "verdict": verdict, "note": note, "updated": str(updated)}


def read_verdicts(path: str | os.PathLike) -> dict[str, dict]:
    """Verdicts by id from ``verdicts.parquet`` or a downloaded ``verdicts.json``
    ({} when the file does not exist).

    Raises:
        VerdictError naming the file (and row) for an unreadable or invalid file."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
                raise ValueError(f"not a {JSON_FORMAT} file")
            rows = doc.get("verdicts")
            if not isinstance(rows, list):
                raise ValueError("'verdicts' must be a list")
        else:
            rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as err:
        raise VerdictError(str(path), f"unreadable verdicts file ({err})") from err
    out: dict[str, dict] = {}
    for k, row in enumerate(rows):
        try:
            v = validate_verdict(row)
        except VerdictError as err:
            raise VerdictError(f"{path} row {k}", str(err)) from None
        out = merge_verdicts(out, {v["id"]: v})
    return out


def merge_verdicts(old: Mapping[str, dict], new: Mapping[str, dict]) -> dict[str, dict]:
    """``old`` updated by ``new``: per id the verdict with the later ``updated`` (``new``
    on a tie)."""
    out = dict(old)
    for sid, v in new.items():
        if sid not in out or _time(v) >= _time(out[sid]):
            out[sid] = v
    return out


def _time(v: Mapping) -> datetime:
    return datetime.fromisoformat(str(v["updated"]).replace("Z", "+00:00"))


def write_verdicts(path: str | os.PathLike, verdicts: Mapping[str, dict]) -> Path:
    """Write ``verdicts`` (by id) to ``path`` atomically, sorted by id."""
    rows = [verdicts[k] for k in sorted(verdicts)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return write_atomic(Path(path), lambda tmp: pq.write_table(table, tmp))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def record_verdict(path: str | os.PathLike, verdict: Mapping) -> dict[str, dict]:
    """Apply one validated verdict (``unset`` removes the id's verdict) to the file at
    ``path`` under its lock; returns every verdict now stored."""
    path = Path(path)
    with _locked(path):
        current = read_verdicts(path)
        if verdict["verdict"] == UNSET:
            current.pop(verdict["id"], None)
        else:
            current[verdict["id"]] = dict(verdict)
        write_verdicts(path, current)
    return current


def merge_into(path: str | os.PathLike, verdicts: Mapping[str, dict]) -> dict[str, dict]:
    """Merge ``verdicts`` into the file at ``path`` (newer wins) under its lock."""
    path = Path(path)
    with _locked(path):
        merged = merge_verdicts(read_verdicts(path), verdicts)
        write_verdicts(path, merged)
    return merged


#: Largest verdict POST body accepted (a verdict is an id, a word and a short note).
MAX_POST_BYTES = 16 * 1024


def post_verdict(
    out_dir: str | os.PathLike, body: bytes, content_type: str | None, known_ids: Iterable[str]
) -> tuple[int, dict]:
    """Handle ``POST /triage/verdicts`` (the Serve app calls this in a worker thread).

    ``body``: JSON ``{"id": ..., "verdict": "interesting"|"artefact"|"normal"|"unset",
    "note": ...}`` for a spectrum of the page (``known_ids``).  Returns (HTTP status,
    JSON payload): 200 ``{"n", "file", "verdicts"}`` once the file is replaced; 413 over
    :data:`MAX_POST_BYTES`; 415 unless ``application/json`` (which also makes a browser
    on another site ask first, a CORS preflight this app never grants); 400 not JSON;
    422 ``{"error": "FIELD: ...", "field"}`` for invalid values.  The input is never
    echoed."""
    if len(body) > MAX_POST_BYTES:
        return 413, {"error": f"body: over {MAX_POST_BYTES} bytes", "field": "body"}
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return 415, {"error": "Content-Type: must be application/json", "field": "Content-Type"}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return 400, {"error": "body: not valid JSON", "field": "body"}
    try:
        v = validate_verdict(obj, known_ids=set(known_ids), allow_unset=True)
    except VerdictError as err:
        return 422, {"error": str(err), "field": err.field}
    v["updated"] = _now()  # the server's clock, not the client's
    path = Path(out_dir) / VERDICTS_FILE
    stored = record_verdict(path, v)
    return 200, {"n": len(stored), "file": str(path), "verdicts": stored}


def verdicts_for_run(out_dir: str | os.PathLike, extra: str | os.PathLike | None) -> dict:
    """The verdicts a ``mendis score`` run into ``out_dir`` carries: ``extra`` (a
    downloaded ``verdicts.json`` or another ``verdicts.parquet``; validated first, so a
    bad file stops the run before any scoring) merged into ``out_dir/verdicts.parquet``,
    then everything stored there."""
    path = Path(out_dir) / VERDICTS_FILE
    if extra is not None:
        extra = Path(extra)
        if not extra.is_file():
            raise VerdictError(str(extra), "no such verdicts file")
        if extra.resolve() != path.resolve():
            return merge_into(path, read_verdicts(extra))
    return read_verdicts(path)
