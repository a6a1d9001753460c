"""Where a benchmark's numbers go: STEM.json (everything measured, for re-analysis) and STEM.md (the
table a reader looks at, also printed so a log shows it)."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence


def write_results(stem: str, record: Any, lines: Sequence[str]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
