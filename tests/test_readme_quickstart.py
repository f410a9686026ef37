"""The README quick start runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_code() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart:begin -->(.*?)<!-- quickstart:end -->", text, re.S)
    assert block, "README has no quickstart markers"
    code = re.findall(r"```python\n(.*?)```", block.group(1), re.S)
    assert len(code) == 1, "the quick start holds exactly one python block"
    return code[0]


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(_quickstart_code(), str(README), "exec"), namespace)
    masks, model = namespace["masks"], namespace["model"]
    assert (tmp_path / "masks.pt").is_file()
    # the four pruned layers, and the BatchNorm after each conv: its channels go with the conv's (joined masks)
    assert set(masks) == {"conv1", "conv2", "conv3", "fc1", "bn1", "bn2", "bn3"}
    kept = {n: int(m["weight"].reshape(m["weight"].shape[0], -1).all(1).sum()) for n, m in masks.items()}
    assert kept == {"conv1": 16, "conv2": 32, "conv3": 32, "fc1": 32, "bn1": 16, "bn2": 32, "bn3": 32}
    for i in (1, 2, 3):
        conv_kept = masks[f"conv{i}"]["weight"].reshape(masks[f"conv{i}"]["weight"].shape[0], -1).all(1)
        assert torch.equal(masks[f"bn{i}"]["weight"], conv_kept) and torch.equal(masks[f"bn{i}"]["bias"], conv_kept)
    assert all(m["weight"].dtype == torch.bool for m in masks.values())
    pruned = ~masks["conv2"]["weight"]
    assert float(model.conv2.weight.detach()[pruned].abs().max()) == 0.0
