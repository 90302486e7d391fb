"""The README stays true: its commands exist, its generated tables match the code, CI runs its tests."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from sq2trt.report import support_matrix_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_levels_table_is_generated_from_code():
    block = re.search(r"<!-- levels:start -->\n(.*?)\n<!-- levels:end -->", README, re.S)
    assert block, "README lost its levels markers"
    assert block.group(1).strip() == support_matrix_markdown().strip(), \
        "README levels table is stale: paste the output of `sq2trt levels`"


def test_setup_commands_are_real_make_targets():
    for cmd in ("make engine", "make test"):
        assert f"{cmd} " in README or f"{cmd}\n" in README
    for target in ("engine", "test", "fetch-model"):
        out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_documented_subcommands_exist():
    from sq2trt.cli import build_parser

    help_text = build_parser().format_help()
    for sub in re.findall(r"`sq2trt (\w+)", README):
        assert sub in help_text, f"README mentions `sq2trt {sub}` but the CLI has no such subcommand"
