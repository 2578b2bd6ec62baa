"""The headless runner: runs notebooks in order, reports a failing cell, and keeps going."""
import nbformat

from qlora_nb import runner
from qlora_nb.profiles import notebook_parameters


def _notebook(path, sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_failing_notebook_is_reported_and_the_next_still_runs(tmp_path, capsys):
    bad = _notebook(tmp_path / "01_bad.ipynb", ["profile = 'x'", "x = 1", "raise ValueError('boom in cell two')"])
    good = _notebook(tmp_path / "02_good.ipynb", ["profile = 'x'", "print(profile)"])
    results = runner.run_all("ci", out_dir=tmp_path / "out", paths=[bad, good])
    assert [r.status for r in results] == ["failed", "ok"]
    assert "ValueError" in results[0].error and "boom in cell two" in results[0].error
    assert "cell [" in results[0].error
    executed = nbformat.read(tmp_path / "out" / "02_good.ipynb", as_version=4)
    assert any("ci" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    table = capsys.readouterr().out
    assert "01_bad" in table and "failed" in table and "1/2 ok" in table


def test_profiles_are_checked():
    assert notebook_parameters("ci", "05_finetune")["profile"] == "ci"
    try:
        notebook_parameters("fast", "05_finetune")
    except ValueError as err:
        assert "ci, full, gpu" in str(err)
    else:
        raise AssertionError("an unknown profile must be refused")
