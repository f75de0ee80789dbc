"""tools/measure_abstention.py and tools/bench_protocol.py: counts by hand, and each runs end to end on tiny inputs."""
import json

import numpy as np
import torch
from PIL import Image

from score_rules import unknown_id
from test_evaluate import write_tiny_run
from tools import bench_protocol, measure_abstention


def test_abstention_counts_by_hand():
    # dataset classes 0..3, asked: class 2 (label 0) and class 0 (label 1); -1 = ignore
    target = torch.tensor([[2, 2, 0, 0, 1, 1, 3, -1]])
    U = unknown_id(2)  # two asked labels
    ids = torch.tensor([[0, U, 1, 0, U, 1, 0, U]])
    got = measure_abstention.count(ids, target, torch.tensor([2, 0]))
    assert got == {"asked_right": 2,        # pixel 0 (2 -> label 0 = class 2), pixel 2 (0 -> label 1 = class 0)
                   "asked_unknown": 1,      # pixel 1
                   "asked_wrong": 1,        # pixel 3 (class 0 labelled as class 2)
                   "other_unknown": 1,      # pixel 4 (class 1)
                   "other_labelled": 2}     # pixels 5 and 6; pixel 7 is ignored
    unknown, pixels = measure_abstention.unknown_per_class(ids, target, 4, U)
    assert unknown.tolist() == [0, 1, 1, 0] and pixels.tolist() == [2, 2, 2, 1]


def test_measure_abstention_runs(tmp_path):
    yaml_path, _, _ = write_tiny_run(tmp_path)
    measure_abstention.main([f"--dataset={yaml_path}", f"--checkpoint={tmp_path / 'ckpt.pt'}",
                             f"--embeddings={tmp_path / 'table.pt'}", "--asked=Sky,Road", "--base_size=32",
                             "--sliding=false", "--thresholds=[-1, 0.0, 2.0]", "--device=cpu",
                             f"--out={tmp_path / 'a.json'}"])
    result = json.loads((tmp_path / "a.json").read_text())
    assert "sky" not in result["background"] and "vegetation" in result["background"]
    labels = np.stack([np.asarray(Image.open(tmp_path / "data" / "lab" / f"{i}.png")) for i in range(3)])
    asked, other = np.isin(labels, [0, 3]).sum(), (~np.isin(labels, [0, 3, 11])).sum()  # Sky 0, Road 3, ignore 11
    for row in result["rows"]:
        assert row["asked_right"] + row["asked_unknown"] + row["asked_wrong"] == asked
        assert row["other_unknown"] + row["other_labelled"] == other
        if row["unknown_below"] == 2.0:                        # above any cosine: everything abstains
            assert row["other_unknown_share"] == 1 and row["asked_abstained_share"] == 1
            assert set(row["unknown_share_per_class"].values()) == {1.0}
        if row["unknown_below"] == -1 and not row["background"]:
            assert row["other_unknown"] == 0 and row["asked_unknown"] == 0  # forced: nothing is unknown
    assert result["provenance"]["sha256"]["checkpoint"]["sha256"]


def test_bench_protocol_runs(tmp_path):
    bench_protocol.main(["--height=40", "--width=56", "--base_size=48", "--crop_size=32", "--images=1", "--rounds=1",
                         "--scales=[0.5, 1.0]", "--embed_dim=32", f"--out={tmp_path / 'b.json'}"])
    result = json.loads((tmp_path / "b.json").read_text())
    # by hand: 0.5 -> 24x34 padded to 32x34: 1x2 windows; 1.0 -> 48x67: 2x3 (stride ceil(32 * 2/3) = 22)
    assert result["windows_per_image"] == 8
    assert result["pixels_labelled_differently"] == 0 and set(result["images_per_s"]) == {"plain", "batched"}
    assert result["provenance"]["precision"] == "fp32"
