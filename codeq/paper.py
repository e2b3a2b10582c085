"""The CoDeQ paper's ResNet-20 / CIFAR-10 results (Wenshøj et al. 2025, Table 2; means of 3 runs).

Each result's Rel. BOPs % was counted by its own convention: "unstructured" (every zero weight saves its
MACs, the paper's count), "structured" (only removed channels save compute: GETA) or "dense" (the 32-bit
baseline, 100 % by either count). A codeq run reports both counts; compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's table: method, weight bits, counting convention, top-1 %, Rel. BOPs %."""

    method: str
    weights: str
    counting: str
    accuracy_pct: float
    rel_bops_pct: float

    @property
    def label(self) -> str:
        return f"{self.method} {self.weights} ({self.counting})"

    def counts_as(self, kind: str) -> bool:
        """Whether this Rel. BOPs % is comparable with a run's `kind` (structured/unstructured) Rel. BOPs %."""
        return self.counting in (kind, "dense")


PAPER_RESULTS = (
    PaperResult("baseline", "32-bit", "dense", 91.70, 100.0),
    PaperResult("SQL", "MP", "unstructured", 90.90, 6.1),
    PaperResult("QST-P", "MP", "unstructured", 91.80, 5.0),
    PaperResult("GETA", "MP", "structured", 91.42, 4.5),
    PaperResult("QST-Q", "MP", "unstructured", 91.60, 3.3),
    PaperResult("CoDeQ", "4-bit", "unstructured", 91.88, 2.95),
    PaperResult("CoDeQ", "MP", "unstructured", 91.86, 2.61),
)
