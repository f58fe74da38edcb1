"""What the tests share besides fixtures (those are in tests/conftest.py).

Imported as `tests.helpers.<module>`: pytest puts the repository root on sys.path (pyproject.toml,
`pythonpath = ["."]`).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
