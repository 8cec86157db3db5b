"""`gkd plan --plot`: the file name's suffix chooses the image format; another suffix is refused before
anything is planned or written."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from gkd.cli import main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def test_svg_and_pdf_follow_the_suffix(tmp_path: Path) -> None:
    svg, pdf = tmp_path / "m.svg", tmp_path / "m.pdf"
    for path in (svg, pdf):
        result = CliRunner().invoke(main, ["plan", TINY, "--gpus", "2", "--plot", str(path)])
        assert result.exit_code == 0, result.output
    assert b"<svg" in svg.read_bytes()[:400]
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_an_unknown_suffix_is_refused_and_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(
        main, ["plan", TINY, "--gpus", "2", "-o", str(out), "--plot", str(tmp_path / "m.jpg")]
    )
    assert result.exit_code == 2
    assert "ending in .png, .svg, .pdf" in result.output
    assert not out.exists() and not (tmp_path / "m.jpg").exists()
