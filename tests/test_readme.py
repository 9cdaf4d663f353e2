"""The README's numbers come from the tool: each `# ...: N GiB of tensors ...` comment above an
`estimate-mem` command in README.md must be what that command prints today."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from microft.cli import app
from microft.ui import fmt_bytes

README = Path(__file__).parent.parent / "README.md"
CLAIM = re.compile(r"^# .*?: (\d+\.\d\d [KMG]iB) of tensors(?: at the (.+))?$")


def claims() -> list[tuple[str, str | None, list[str]]]:
    lines = README.read_text(encoding="utf-8").splitlines()
    out = []
    for claim, cmd in zip(lines, lines[1:]):
        m = CLAIM.match(claim.strip())
        if m and cmd.startswith("microft estimate-mem"):
            out.append((m.group(1), m.group(2), shlex.split(cmd)[1:]))
    return out


def test_readme_estimates_match_the_tool():
    found = claims()
    assert found, "the README's estimate example is gone; keep one (and this test) or delete both"
    for size, phase, args in found:
        res = CliRunner().invoke(app, [*args, "--json"])
        assert res.exit_code == 0, res.output
        d = json.loads(res.output)
        got = fmt_bytes(d["peak_bytes"])
        assert got == size, f"README says {size} for {args}; the tool says {got}"
        if phase:
            assert d["peak_phase"] == phase, (phase, d["peak_phase"])
