"""Golden test: the CLI and config surface change only deliberately.

If this fails after an intended change, regenerate with
``python tests/test_cli_golden.py > tests/golden/surface.txt`` and mention it in the commit.
"""

import argparse
from pathlib import Path

from mpigls import cli, config

GOLDEN = Path(__file__).parent / "golden" / "surface.txt"
CONFIG_DOC = Path(__file__).parents[1] / "docs" / "guide" / "configuration.md"


def surface() -> str:
    lines = []
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sorted(sub.choices.items()):
        opts = sorted(o for a in p._actions for o in (a.option_strings or [a.dest]) if o not in ("-h", "--help"))
        lines.append(f"mpigls {name}: {' '.join(opts)}")
    lines += [f"config {k} = {d}" for k, d, _ in config.describe()]
    return "\n".join(lines) + "\n"


def test_surface_matches_golden():
    assert surface() == GOLDEN.read_text()


def test_docs_config_table_is_mpigls_config_markdown(capsys):
    """The key table of docs/guide/configuration.md is the output of `mpigls config --markdown`."""
    text = CONFIG_DOC.read_text()
    begin, end = "<!-- mpigls config --markdown: begin -->\n", "<!-- mpigls config --markdown: end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert cli.main(["config", "--markdown"]) == 0
    assert table == capsys.readouterr().out, "regenerate docs/guide/configuration.md's table: mpigls config --markdown"


def test_main_returns_exit_codes(capsys, tmp_path):
    assert cli.main(["config"]) == 0
    assert "optimizer.popsize" in capsys.readouterr().out
    assert cli.main(["train", "--out", str(tmp_path), "--set", "optimizer.popsize=3"]) == 2
    assert "popsize must be even" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path), "--print-config", "--set", "train.seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out


if __name__ == "__main__":
    print(surface(), end="")
