"""tools/method_survey.py: the README's method-by-family table comes from real runs - a method that trains is listed
as running, one that refuses the pair is listed with its one-line reason."""

import importlib.util
import os

import pytest

pytest.importorskip("timm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))  # the tool imports tools/_path.py
    spec = importlib.util.spec_from_file_location("method_survey", os.path.join(ROOT, "tools", "method_survey.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_survey_lists_running_and_refused_methods(tmp_path, capsys, monkeypatch):
    out = tmp_path / "survey.md"
    assert load_tool(monkeypatch).main(["--methods", "KD", "SIMKD", "--pairs", "ours", "vit", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("| teacher -> student |") and len(rows) == 4
    assert rows[2] == "| ours -> ours | KD, SIMKD | - |"
    # SimKD reuses the teacher's classifier: a timm ViT's head is not one of the classifier names it reads
    vit = rows[3]
    assert vit.startswith("| timm ViT -> our CNN | KD | SIMKD (config key DISTILLER.TEACHER: SIMKD reuses the teacher's")
    assert "CRASH" not in out.read_text()
    assert capsys.readouterr().out.strip() == out.read_text().strip()
