"""One finding of the dataset lint report: what is wrong (or worth knowing), and what to do."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ITEMS = 20  # listed per finding; the count says how many there are in all


@dataclass
class Finding:
    code: str
    severity: str  # "error" | "warning" | "info"
    message: str
    action: str
    count: int = 0
    items: list = field(default_factory=list)


def add(findings: list[Finding], code: str, severity: str, message: str, action: str,
        items: list | None = None, count: int | None = None) -> None:
    items = items or []
    findings.append(Finding(code, severity, message, action,
                            len(items) if count is None else count, items[:MAX_ITEMS]))
