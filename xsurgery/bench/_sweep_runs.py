"""One run of a sweep (a variant at a seed) and what its folder holds once trained."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ._variants import Variant

__all__ = ["SweepRun", "curve", "finished", "result", "slug"]


@dataclass(frozen=True)
class SweepRun:
    """One training of the sweep: a variant at a seed, with its resolved recipe and folder."""

    variant: Variant
    seed: int
    folder: str
    recipe: dict[str, Any]
    needs: str | None = None  # the folder of the run it starts from (trained first)

    @property
    def key(self) -> str:
        return f"{self.variant.name}/s{self.seed}"

    @property
    def done(self) -> bool:
        return finished(self.folder)


def finished(folder: str) -> bool:
    """A run folder whose training finished (it holds its result)."""
    from ..train import RESULT

    return os.path.isfile(os.path.join(folder, RESULT))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def curve(run: SweepRun) -> list[float]:
    """The run's validation (else test) top-1 per epoch, from its ``metrics.jsonl``."""
    path = os.path.join(run.folder, "metrics.jsonl")
    points = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                points.append(rec.get("val_top1", rec.get("test_top1")))
    return [float(v) for v in points if v is not None]


def result(run: SweepRun) -> dict[str, Any]:
    from ..train import RESULT

    with open(os.path.join(run.folder, RESULT), encoding="utf-8") as f:
        return json.load(f)
