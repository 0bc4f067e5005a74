"""The demo command runs end to end and reports what it did."""

from vqfast.__main__ import main


def test_demo_runs_and_reports(capsys):
    main(["demo", "--size", "32"])
    out = capsys.readouterr().out
    assert "-> 4x4 tokens" in out
    assert "image (1, 3, 32, 32)" in out.splitlines()[2].split("->")[-1]
    assert "codebook search scratch" in out
