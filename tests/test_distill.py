"""Distillation fine-tuning: a head/FFN-pruned student learns the dense teacher's embeddings."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.pruning.distill import distill, distillation_evaluator, distillation_loss  # noqa: E402
from deploycompress.speedup import speedup  # noqa: E402
from test_hf_attention import ffn_masks, head_masks, tiny_bert  # noqa: E402
from test_hf_int8 import feeds  # noqa: E402


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in feeds(n, 4, 10, seed)]


def mean_cos(a: torch.nn.Module, b: torch.nn.Module, data) -> float:
    with torch.no_grad():
        return float(torch.cat([torch.cosine_similarity(a(*x), b(*x), dim=-1).reshape(-1) for x in data]).mean())


def test_distilled_student_moves_towards_teacher_on_held_out_inputs() -> None:
    teacher = Encoder(tiny_bert(), pooling="none")  # per-token hidden states: pooled random embeddings all look alike
    masks = {f"model.{k}": v for k, v in {**head_masks(0, [0, 1]), **head_masks(1, [2, 3]), **ffn_masks(0), **ffn_masks(1)}.items()}
    other = Encoder(tiny_bert(seed=1), pooling="none")  # a student that starts far from the teacher
    student = speedup(other, masks, batches(1, 0)[0])
    assert student.model.encoder.layer[0].attention.self.num_attention_heads == 2
    teacher_before = copy.deepcopy(teacher.state_dict())
    held_out = batches(4, 99)
    before = mean_cos(student, teacher, held_out)
    result = distill(student, teacher, batches(8, 1), steps=60, lr=1e-3, progress=False)
    after = mean_cos(student, teacher, held_out)
    assert result.last_loss < result.first_loss
    assert after > before + 0.01 and 1 - after < 0.7 * (1 - before)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())  # teacher untouched
    assert not student.training


def test_bad_arguments_and_loss_values() -> None:
    t = Encoder(tiny_bert())
    with pytest.raises(ValueError, match="same module"):
        distill(t, t, batches(1, 0))
    with pytest.raises(ValueError, match="loss"):
        distill(copy.deepcopy(t), t, batches(1, 0), loss="kld")
    with pytest.raises(ValueError, match="empty"):
        distill(copy.deepcopy(t), t, [])
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert float(distillation_loss(a, b, "cosine")) == pytest.approx(1.0)
    assert float(distillation_loss(a, b, "mse")) == pytest.approx(2.5)


def test_evaluator_trains_through_the_distillation_step() -> None:
    teacher = Encoder(tiny_bert(), pooling="none")
    student = Encoder(tiny_bert(seed=1), pooling="none")
    data = batches(4, 3)
    before = mean_cos(student, teacher, data)
    ev = distillation_evaluator(teacher, data, lr=3e-3)
    ev.training_func(student, ev._optimizers(student), ev.training_step, None, 40, None)
    assert mean_cos(student, teacher, data) > before + 0.01


def test_hidden_state_matching_pulls_every_layer_towards_the_teacher() -> None:
    teacher = Encoder(tiny_bert(), pooling="mean")
    student = Encoder(tiny_bert(seed=1), pooling="mean")
    layers = [f"model.encoder.layer.{i}" for i in range(2)]
    data, held_out = batches(8, 1), batches(4, 99)

    def layer_mse(model: torch.nn.Module) -> float:  # an independent read of the layers' outputs
        with torch.no_grad():
            errs = []
            for ids, mask in held_out:
                s = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                t = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                errs += [float(((a - b) ** 2).mean()) for a, b in zip(s[1:], t[1:])]
        return sum(errs) / len(errs)

    def hooks(model: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    before = layer_mse(student)  # (transformers installs its own output-recording hooks on first use)
    plain, counts = copy.deepcopy(student), (hooks(student), hooks(teacher))
    distill(plain, teacher, data, steps=40, lr=1e-3, progress=False)
    result = distill(student, teacher, data, steps=40, lr=1e-3, hidden=layers, hidden_weight=1.0, schedule="linear", progress=False)
    assert result.last_loss < result.first_loss
    assert layer_mse(student) < 0.5 * before  # the layers themselves moved
    assert layer_mse(student) < layer_mse(plain)  # more than by matching the pooled output alone
    assert (hooks(student), hooks(teacher)) == counts  # ours removed
    with pytest.raises(ValueError, match="no submodule"):
        distill(copy.deepcopy(student), teacher, data, steps=1, hidden=["model.encoder.layer.9"])
    with pytest.raises(ValueError, match="schedule"):
        distill(copy.deepcopy(student), teacher, data, steps=1, schedule="cosine")


def test_teacher_inside_a_wrapper_in_training_mode_stays_as_it_was() -> None:
    bert = tiny_bert()  # eval mode, as from_pretrained leaves it
    teacher = Encoder(bert)  # a new wrapper: training mode
    student = copy.deepcopy(teacher)
    distill(student, teacher, batches(2, 0), steps=2, progress=False)
    assert teacher.training and not any(m.training for m in bert.modules())  # no dropout left switched on
