"""README.md's "Adding a component" code, as written, passes the registry-parametrized tests: the README says
that a new component needs no new test, so its own example must need none either."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import ROOT

SECTION = "## Adding a component"
REGISTRY_TESTS = ("tests/test_components.py", "tests/test_fused.py")
OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|SKIPPED|FAILED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)


def section_code_blocks() -> list[str]:
    """The python code blocks of README.md's "Adding a component" section, as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)


def test_the_readmes_components_pass_the_registry_tests_as_written(tmp_path):
    blocks = section_code_blocks()
    names = [name for block in blocks for name in re.findall(r"\.register\(\s*\"([^\"]+)\"", block)]
    assert names, f"no registered component in the python blocks of README.md's {SECTION!r}"
    module = tmp_path / "readme_components.py"
    module.write_text("\n\n".join(blocks))

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "0", "-v", "-p", "no:cacheprovider", *REGISTRY_TESTS, "-k", " or ".join(names)],
        cwd=ROOT,
        env={**os.environ, "TOOLBOX_TEST_IMPORTS": str(module)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    outcomes = OUTCOME.findall(done.stdout)
    for name in names:
        # A parametrized test's id holds the component's name between [, - and ].
        own = [(test, outcome) for test, outcome in outcomes if re.search(rf"[\[-]{re.escape(name)}[\]-]", test)]
        assert own, f"no registry test was collected for {name}: {done.stdout[-3000:]}"
        assert any(outcome == "PASSED" for _, outcome in own), f"no registry test passed for {name}: {own}"
