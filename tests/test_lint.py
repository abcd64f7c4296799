"""The Python sources pass ``ruff check`` with the project's configuration (pyproject.toml)."""

from __future__ import annotations

import subprocess

from conftest import REPO, linter


def test_python_sources_pass_ruff():
    result = subprocess.run([linter("ruff"), "check", "--no-cache", "--output-format", "concise", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
