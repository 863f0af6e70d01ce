"""The cross-check script runs, and its two classifier biases give the post-processing loads the
README says: none above the score threshold with torchvision's prior, a full one with N(-4, 1)."""
import pytest
import torch

from benchmarks import crosscheck_model as cc


@pytest.mark.parametrize("busy, detections", [(False, 0), (True, 300)])
def test_the_two_loads(busy, detections):
    tv, ours = cc._models(busy=busy)
    images, _ = cc._inputs()
    for m in (tv, ours):
        m.eval()
    with torch.no_grad():
        out_tv, out_ours = tv(images), ours(images)
    assert [len(d["boxes"]) for d in out_tv] == [detections] * 2
    assert [len(d["boxes"]) for d in out_ours] == [detections] * 2


def test_an_unknown_phase_is_refused():
    with pytest.raises(SystemExit) as e:
        cc.main(["--phases", "infer,inference"])
    assert e.value.code == 2


def test_table_lines(tmp_path):
    out = tmp_path / "cross.txt"
    cc.main(["--rounds", "1", "--phases", "infer,parts", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert "classifier bias torchvision prior" in lines[0]
    rows = lines[2:]
    assert len(rows) == 5 + 8  # 4 like-for-like rows and ours' default, then 4 settings x 2 parts
    for row in rows:
        t_tv, t_ours, ratio = row.split()[-3:]
        assert float(t_tv) > 0 and float(t_ours) > 0
        assert ratio.endswith("x") and abs(float(ratio[:-1]) - float(t_tv) / float(t_ours)) < 0.02
