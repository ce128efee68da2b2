"""README.md's "Adding a component" code, as written, passes the registry-parametrized tests: the README says
that a new component needs no new test, so its own example must need none either."""

from __future__ import annotations

import re

from helpers import ROOT, assert_registry_tests_pass

SECTION = "## Adding a component"


def section_code_blocks() -> list[str]:
    """The python code blocks of README.md's "Adding a component" section, as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)


def test_the_readmes_components_pass_the_registry_tests_as_written(tmp_path):
    blocks = section_code_blocks()
    module = tmp_path / "readme_components.py"
    module.write_text("\n\n".join(blocks))
    assert_registry_tests_pass(module)
