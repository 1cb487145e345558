"""examples/reweighted_ramachandran.py at a tiny size: trains a tiny ALDP generator, writes the PNG."""
import numpy as np

from helpers import load_script


def test_reweighted_ramachandran_example_writes_png(tmp_path, capsys):
    example = load_script("examples/reweighted_ramachandran.py")
    out = tmp_path / "fes.png"
    result = example.main(["--tiny", "--n", "400", "--bins", "12", "--bootstrap", "20", "--out", str(out)])
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < result["ess"] <= 1
    fes = result["surface"]
    finite = np.isfinite(fes.free_energy)
    assert finite.any() and np.nanmin(fes.free_energy[finite]) == 0.0
    assert np.all(fes.error[finite] >= 0)
    assert abs(sum(v.value for v in result["populations"].values()) - 1.0) < 1e-9
    assert "wrote" in capsys.readouterr().out
