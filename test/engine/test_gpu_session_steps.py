"""tools/gpu_session.sh: every step it accepts has a branch that runs it, and every branch is accepted. A step
name that only one side knows costs a device call: accepted and silently skipped, or refused at the start."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_session.sh"


def test_the_accepted_steps_and_the_run_branches_are_the_same() -> None:
    text = SCRIPT.read_text()
    listed = set(re.search(r'^STEPS="([^"]*)"', text, re.MULTILINE).group(1).split())
    loop = text[text.rindex('case "$step" in'):]
    branches = set()
    for label in re.findall(r"^    ([a-z0-9|-]+)\)", loop, re.MULTILINE):
        branches.update(label.split("|"))
    assert listed == branches, (sorted(listed - branches), sorted(branches - listed))
    # every step is documented in the header
    header = text[:text.index("set -uo pipefail")]
    assert not [step for step in listed if step not in header], "a step missing from the header's list"
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
