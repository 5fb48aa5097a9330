"""The README's quick-start snippet runs as written, and .ci/run calls the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(snippet, "README quick start", "exec"), {})


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme)
    assert len(commands) >= 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
