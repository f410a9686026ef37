"""MiniLMv2 self-attention relation loss: hand-computed values, padding, head counts, use inside distill."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from deploycompress.hf.distill_losses import AttentionRelationLoss, relation_kl, relation_log_probs
from deploycompress.pruning.distill import distill


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_relation_kl_hand_computed() -> None:
    # one relation head of width 1: teacher tokens (1, 2), student tokens (1, 1)
    # teacher logits [[1, 2], [2, 4]] -> rows (1, e)/(1+e) and (1, e^2)/(1+e^2); student logits all 1 -> uniform
    teacher = torch.tensor([[[1.0], [2.0]]])
    student = torch.tensor([[[1.0], [1.0]]])
    e = math.e
    row0 = [1 / (1 + e), e / (1 + e)]
    row1 = [1 / (1 + e**2), e**2 / (1 + e**2)]
    expected = (_kl(row0, [0.5, 0.5]) + _kl(row1, [0.5, 0.5])) / 2
    assert float(relation_kl(student, teacher, heads=1)) == pytest.approx(expected, rel=1e-6)
    assert expected > 0.05  # the test can fail: a real divergence
    assert float(relation_kl(teacher, teacher, heads=1)) == pytest.approx(0.0, abs=1e-7)


def test_relation_heads_split_columns_and_scale() -> None:
    # two relation heads of width 2: head a sees columns 0-1, head b columns 2-3; scale 1/sqrt(2)
    x = torch.tensor([[[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 1.0, 1.0]]])
    lp = relation_log_probs(x, heads=2)
    assert lp.shape == (1, 2, 2, 2)
    s = 1 / math.sqrt(2)
    head_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * s
    head_b = torch.tensor([[4.0, 2.0], [2.0, 2.0]]) * s
    torch.testing.assert_close(lp[0, 0], torch.log_softmax(head_a, -1))
    torch.testing.assert_close(lp[0, 1], torch.log_softmax(head_b, -1))


def test_padding_is_left_out() -> None:
    # the hand-computed case padded with a third token: the same value (padding keys and rows not counted)
    teacher = torch.tensor([[[1.0], [2.0], [7.0]]])
    student = torch.tensor([[[1.0], [1.0], [-5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    got = float(relation_kl(student, teacher, 1, mask))
    want = float(relation_kl(student[:, :2], teacher[:, :2], 1))
    assert got == pytest.approx(want, rel=1e-6)
    assert float(relation_kl(student, teacher, 1)) != pytest.approx(want, rel=1e-3)  # without the mask it differs
    assert relation_log_probs(teacher, 1, mask)[0, 0, :, 2].exp().max() == 0


def test_different_widths_and_errors() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 12), torch.randn(2, 5, 6)  # teacher 12 columns, student 6 (half the heads)
    assert float(relation_kl(s, t, heads=3)) > 0
    with pytest.raises(ValueError, match="relation heads"):
        relation_kl(s, t, heads=4)  # 6 columns do not split into 4
    with pytest.raises(ValueError, match="batch or sequence"):
        relation_kl(s[:, :4], t, heads=3)


transformers = pytest.importorskip("transformers")


def _tiny(heads: int = 4, seed: int = 0):  # noqa: ANN202
    from deploycompress.hf import Encoder

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=32,
                                  max_position_embeddings=16, attn_implementation="eager")  # fmt: skip
    return Encoder(transformers.BertModel(cfg, add_pooling_layer=False).eval())


def test_module_loss_matches_function_and_trains() -> None:
    teacher = _tiny(seed=0)
    student = _tiny(seed=1)
    batch = (torch.randint(1, 50, (3, 8)), torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 8]))
    rel = AttentionRelationLoss(student, teacher, heads=4)
    with torch.no_grad():
        teacher(*batch)
        student(*batch)
    # independent: Q/K/V of each layer recomputed from the layer inputs through the Linears by hand
    with torch.no_grad():
        hs_t = teacher.model(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True).hidden_states
        hs_s = student.model(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True).hidden_states
        want = 0.0
        for r in ("query", "key", "value"):
            terms = []
            for i in range(2):
                lt, ls = getattr(teacher.model.encoder.layer[i].attention.self, r), getattr(student.model.encoder.layer[i].attention.self, r)
                terms.append(relation_kl(ls(hs_s[i]), lt(hs_t[i]), 4, batch[1]))
            want += sum(terms) / 2
    assert float(rel.loss(batch)) == pytest.approx(float(want), rel=1e-5)
    before = float(want)
    d = distill(copy.deepcopy(student), teacher, [batch], steps=1, lr=1e-3, progress=False)  # no extra: still trains
    assert d.steps == 1
    rel.remove()
    trained = copy.deepcopy(student)
    rel2 = AttentionRelationLoss(trained, teacher, heads=4)
    distill(trained, teacher, [batch], steps=60, lr=3e-3, progress=False, extra_loss=rel2, extra_weight=10.0)
    with torch.no_grad():
        teacher(*batch)
        trained(*batch)
    after = float(rel2.loss(batch))
    rel2.remove()
    assert after < 0.5 * before


def test_module_errors() -> None:
    teacher, student = _tiny(4), _tiny(2, seed=1)
    with pytest.raises(ValueError, match="relations"):
        AttentionRelationLoss(student, teacher, relations=("attention",))
    with pytest.raises(ValueError, match="heads must be >= 1"):
        AttentionRelationLoss(student, teacher, heads=0)
    odd = AttentionRelationLoss(student, teacher, heads=3)  # 3 does not divide 16: gcd(3, 16, 16) = 1 relation head
    assert set(odd.layer_heads.values()) == {1}
    odd.remove()
    six = AttentionRelationLoss(student, teacher, heads=6)  # gcd(6, 16) = 2
    assert set(six.layer_heads.values()) == {2}
    six.remove()
    with pytest.raises(ValueError, match="no module"):
        AttentionRelationLoss(student, teacher, layers=[5])
    # nothing left hooked after a failed construction
    assert all(not m._forward_hooks for m in student.modules())
    assert all(not m._forward_hooks for m in teacher.modules())


def test_distill_autocast_bf16_runs_the_student_in_bf16_and_learns() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    data = [torch.randn(32, 8) for _ in range(4)]
    seen: list[torch.dtype] = []
    h = student[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    d = distill(student, teacher, data, steps=150, lr=1e-2, loss="mse", progress=False, autocast=torch.bfloat16)
    h.remove()
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert d.last_loss < 0.2 * d.first_loss
    with pytest.raises(ValueError, match="autocast must be"):
        distill(student, teacher, data, steps=1, autocast=torch.float32, progress=False)


def test_distill_on_step_sees_every_step_and_the_student() -> None:
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    calls: list[tuple[int, bool]] = []
    distill(student, teacher, [torch.randn(8, 4)], steps=5, lr=1e-2, loss="mse", progress=False,
            on_step=lambda i, m: calls.append((i, m is student)))
    assert calls == [(i, True) for i in range(5)]
