"""raugment's tests: they mirror the package (core/, runtime/, models/, lib/, stages/<stage>/, study/, demo/)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
