"""The README's Python snippets run as written, and .ci/run calls the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_snippets_run():
    readme = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(snippets) >= 2  # the quick start and the conversion example
    for i, snippet in enumerate(snippets):
        exec(compile(snippet, f"README snippet {i}", "exec"), {})


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme)
    assert len(commands) >= 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
