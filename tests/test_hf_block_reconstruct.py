"""Block-wise reconstruction of a pruned encoder (hf.block_reconstruct): errors measured here, by the test's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.block_reconstruct import block_reconstruct, token_mask  # noqa: E402
from deploycompress.speedup import speedup  # noqa: E402

HIDDEN, HEADS, HEAD, FFN, LAYERS = 32, 4, 8, 16, 2


def tiny_bert() -> Encoder:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FFN, max_position_embeddings=32, attn_implementation="eager",
                                  initializer_range=0.3)  # fmt: skip
    return Encoder(transformers.BertModel(cfg, add_pooling_layer=False).eval(), pooling="none")


def batches(n: int = 6, seq: int = 12, pad: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask); the last ``pad`` tokens of every other row are padding."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        mask = torch.ones(4, seq, dtype=torch.long)
        if pad:
            mask[::2, seq - pad :] = 0
        out.append((torch.randint(1, 100, (4, seq), generator=g), mask))
    return out


def layer_outputs(model: Encoder, batch) -> list[torch.Tensor]:  # noqa: ANN001
    """Every layer's output hidden states, recorded by hooks written here."""
    got: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: got.append((out[0] if isinstance(out, tuple) else out).detach()))
             for layer in model.model.encoder.layer]
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for h in hooks:
            h.remove()
    return got


def rel_error(student: Encoder, dense: Encoder, data, layer: int, counted=None) -> float:  # noqa: ANN001
    """||H_student - H_dense|| / ||H_dense|| of one layer's output over the tokens ``counted(batch)`` marks (all)."""
    num = den = 0.0
    for b in data:
        s, d = layer_outputs(student, b)[layer], layer_outputs(dense, b)[layer]
        w = (counted(b) if counted else torch.ones(s.shape[:2])).unsqueeze(-1)
        num += float(((s - d) ** 2 * w).sum())
        den += float((d**2 * w).sum())
    return (num / den) ** 0.5


def perturbed(dense: Encoder, scale: float = 0.05) -> Encoder:
    """The dense model with noise on every encoder weight: the dense layers are exactly representable."""
    student = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in student.model.encoder.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return student


def test_representable_layers_are_driven_towards_the_dense_ones_and_errors_are_reported_as_measured() -> None:
    dense = tiny_bert()
    student = perturbed(dense)
    data = batches()
    before = [rel_error(student, dense, data, i) for i in range(LAYERS)]
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    res = block_reconstruct(dense, student, data, steps=300, lr=3e-3, progress=False)
    after = [rel_error(res.model, dense, data, i) for i in range(LAYERS)]
    assert before[0] > 0.3 and before[1] > 0.2
    assert after[0] < 0.15 * before[0] and after[1] < 0.2 * before[1]  # a perfect solution exists: most of the error goes
    for fit, want in zip(res.layers, after):
        assert fit.error_after == pytest.approx(want, rel=1e-4)  # the reported error is the one this test measures
    assert res.layers[0].error_before == pytest.approx(before[0], rel=1e-4)  # layer 0's inputs are the embeddings: unchanged
    assert res.layers[0].loss_last < 0.1 * res.layers[0].loss_first
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in snapshot.items())  # the caller's student is unchanged
    assert res.model is not student


def test_pruned_student_gets_closer_to_the_dense_output_and_padding_is_left_out() -> None:
    dense = tiny_bert()
    keep = torch.ones(HEADS * HEAD)
    keep[HEAD : 2 * HEAD] = 0  # head 1 of every layer goes (masks written here)
    ffn = torch.ones(FFN)
    ffn[::2] = 0
    masks = {}
    for i in range(LAYERS):
        for p in ("query", "key", "value"):
            masks[f"model.encoder.layer.{i}.attention.self.{p}"] = {"weight": keep.view(-1, 1).expand(-1, HIDDEN).clone(), "bias": keep.clone()}
        masks[f"model.encoder.layer.{i}.intermediate.dense"] = {"weight": ffn.view(-1, 1).expand(-1, HIDDEN).clone(), "bias": ffn.clone()}
    data = batches(pad=4)
    pruned = speedup(copy.deepcopy(dense), masks, data[0])
    assert pruned.model.encoder.layer[0].attention.self.num_attention_heads == HEADS - 1
    real = lambda b: b[1].float()  # noqa: E731  (the tokens that count)
    before = rel_error(pruned, dense, data, LAYERS - 1, real)
    res = block_reconstruct(dense, pruned, data, steps=200, lr=3e-3, progress=False)
    after = rel_error(res.model, dense, data, LAYERS - 1, real)
    assert after < 0.5 * before
    assert res.layers[-1].error_after == pytest.approx(after, rel=1e-4)  # padding left out of the reported error
    assert res.layers[-1].error_after != pytest.approx(rel_error(res.model, dense, data, LAYERS - 1), rel=1e-3)


def test_zero_steps_only_measures() -> None:
    dense = tiny_bert()
    student = perturbed(dense)
    data = batches(n=2)
    res = block_reconstruct(dense, student, data, steps=0, progress=False)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in res.model.state_dict().items())
    assert [f.error_before for f in res.layers] == pytest.approx([rel_error(student, dense, data, i) for i in range(LAYERS)], rel=1e-4)
    same = block_reconstruct(dense, copy.deepcopy(dense), data, steps=0, progress=False)
    assert [f.error_before for f in same.layers] == [0.0, 0.0]


def test_token_mask_reads_the_attention_mask_or_counts_every_token() -> None:
    ids, mask = batches(n=1, pad=3)[0]
    assert torch.equal(token_mask((ids, mask), torch.Size((4, 12, HIDDEN))), mask.float())
    assert torch.equal(token_mask({"input_ids": ids, "attention_mask": mask}, torch.Size((4, 12, HIDDEN))), mask.float())
    assert torch.equal(token_mask(ids, torch.Size((4, 12, HIDDEN))), torch.ones(4, 12))
    assert torch.equal(token_mask((ids, mask), torch.Size((4, 12, HIDDEN)), ("input_ids", "token_type_ids")), torch.ones(4, 12))
    assert torch.equal(token_mask((ids, ids, mask), torch.Size((4, 12, HIDDEN)), ("input_ids", "token_type_ids", "attention_mask")), mask.float())


@pytest.mark.parametrize(("kwargs", "match"), [({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"lr": 0.0}, "lr"),
                                               ({"autocast": torch.float64}, "autocast"), ({"batches": []}, "no batches")])  # fmt: skip
def test_bad_arguments_are_refused_before_work(kwargs: dict, match: str) -> None:
    dense = tiny_bert()
    args = {"batches": batches(n=1), **kwargs}
    with pytest.raises(ValueError, match=match):
        block_reconstruct(dense, perturbed(dense), **args)


def test_models_that_do_not_match_are_refused() -> None:
    dense = tiny_bert()
    with pytest.raises(ValueError, match="same module"):
        block_reconstruct(dense, dense, batches(n=1))
    shorter = copy.deepcopy(dense)
    del shorter.model.encoder.layer[1]
    with pytest.raises(ValueError, match="student 1;"):
        block_reconstruct(dense, shorter, batches(n=1))
    with pytest.raises(ValueError, match="encoder.layer"):
        block_reconstruct(dense, torch.nn.Linear(2, 2), batches(n=1))
