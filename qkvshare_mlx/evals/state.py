"""The study's results file: append-only JSON lines, resumable after a kill.

Every result (a reference chain, a teacher-forced row, a generation row, the
command that wrote them) is one line keyed by (kind, problem, mode, budget,
hops); a rerun skips the keys already there. The module knows the file
format and its keys only, not what the rows mean (``phases`` writes them,
``report`` reads them).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from ..errors import ConfigError

GZIP_CHUNK = 8192  # bytes fed to zlib at a time: bounds each member's unused_data


def read_gzip_text(path: Path) -> str:
    """The text of a gzip file made of whole members (``cat a.gz b.gz`` or one
    member per append). A last member cut short by a kill is dropped from the
    file, so the next append starts on a member boundary; damage anywhere else
    is a ConfigError and the file is left as it is.

    Input goes to zlib in small chunks so that the bytes after a member's end
    (``unused_data``) stay small: feeding the whole rest of the file per member,
    as ``gzip.decompress`` does, is quadratic in the number of appended rows."""
    view = memoryview(path.read_bytes())
    parts, good = [], 0
    while good < len(view):
        d = zlib.decompressobj(wbits=31)
        member, pos = [], good
        while not d.eof and pos < len(view):
            try:
                member.append(d.decompress(view[pos : pos + GZIP_CHUNK]))
            except zlib.error as e:
                raise ConfigError(f"state {path} is corrupt at byte {good}: {e}") from e
            pos = min(pos + GZIP_CHUNK, len(view))
        if not d.eof:
            break
        parts += member
        good = pos - len(d.unused_data)
    if good < len(view):
        with open(path, "r+b") as f:
            f.truncate(good)
    return b"".join(parts).decode()


class State:
    """Append-only JSON lines keyed by (kind, problem, mode, budget, hops).

    A path ending in ``.gz`` is gzip: each ``add`` appends one member, so a
    state stays readable line by line and can be recompressed as one stream
    (``zcat s.gz | gzip -9 > t.gz``) to keep it small."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.gzip = self.path.suffix == ".gz"
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            text = read_gzip_text(self.path) if self.gzip else self.path.read_text()
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill: redo that result
                self.rows[self.key(row)] = row

    @staticmethod
    def key(row: dict) -> tuple:
        if row["kind"] == "meta":  # every command that wrote to this state
            return ("meta", row["problem"], row.get("command"), None, row["hops"])
        budget = row.get("budget_bits")
        return (
            row["kind"],
            row["problem"],
            row["mode"],
            None if budget is None else float(budget),
            row["hops"],
        )

    def __contains__(self, key) -> bool:
        return key in self.rows

    def get(self, key):
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row) + "\n"
        if self.gzip:
            with open(self.path, "ab") as f:
                f.write(gzip.compress(line.encode()))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        self.rows[self.key(row)] = row

    def of_kind(self, kind: str) -> list[dict]:
        return [r for k, r in self.rows.items() if k[0] == kind]
