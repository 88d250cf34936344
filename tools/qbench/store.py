"""``results.json``: every finished row, written atomically after each one, so a run can resume."""

from __future__ import annotations

import json
from pathlib import Path

from qcompiler.graphio import write_text_atomic


class ResultStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = {"meta": {"runs": []}, "models": {}, "rows": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    @property
    def rows(self) -> dict[str, dict]:
        return self.data["rows"]

    @property
    def models(self) -> dict[str, dict]:
        return self.data["models"]

    @property
    def meta(self) -> dict:
        return self.data["meta"]

    def done(self, key: str) -> bool:
        return key in self.rows

    def check_model(self, name: str, fingerprint: dict) -> None:
        """Rows of ``name`` measured on other inputs cannot be mixed with new ones."""
        old = self.models.get(name, {}).get("fingerprint")
        if old is not None and old != fingerprint:
            raise ValueError(f"{self.path}: {name} was measured with {old}, this run uses {fingerprint}; "
                             "pass --fresh to start over")

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.data, indent=1))
