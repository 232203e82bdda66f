"""The hidden-state term: its value and gradient against plain formulas, masks, layer maps."""

import math

import pytest
import torch

from kdqa.hidden_distill import (HiddenStateDistillation, default_layer_map, masked_hidden_distance,
                                 parse_layer_map)


def _hidden(n_layers, batch, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=g, dtype=torch.float64) for _ in range(n_layers + 1))


def _mask(lengths, length):
    return torch.tensor([[1] * n + [0] * (length - n) for n in lengths])


def _plain_distance(h_s, h_t, mask, kind):
    """Token by token, as the docstring writes it."""
    total, count = 0.0, 0
    for b in range(h_s.shape[0]):
        for i in range(h_s.shape[1]):
            if not mask[b, i]:
                continue
            s, t = h_s[b, i].tolist(), h_t[b, i].tolist()
            if kind == "mse":
                total += sum((x - y) ** 2 for x, y in zip(s, t)) / len(s)
            else:
                dot = sum(x * y for x, y in zip(s, t))
                total += 1.0 - dot / (math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in t)))
            count += 1
    return total / count


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_value_matches_the_plain_formula(kind):
    student, teacher = _hidden(3, 2, 5, 4, seed=0), _hidden(6, 2, 5, 4, seed=1)
    mask = _mask([5, 3], 5)
    pairs = [(1, 2), (2, 4), (3, 6)]
    term = HiddenStateDistillation(pairs, 4, 4, kind=kind).double()(student, teacher, mask)
    expected = sum(_plain_distance(student[s], teacher[t], mask, kind) for s, t in pairs) / len(pairs)
    assert term.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_gradient_matches_autograd_of_the_plain_formula(kind):
    h_s = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 6, 3, dtype=torch.float64)
    mask = _mask([6, 2], 6)
    masked_hidden_distance(h_s, h_t, mask, kind).backward()
    ours = h_s.grad.clone()
    h_s.grad = None
    # The same quantity written without masks: only the real tokens, then their mean.
    real = mask.bool()
    if kind == "mse":
        ((h_s[real] - h_t[real]) ** 2).mean(dim=-1).mean().backward()
    else:
        (1 - torch.nn.functional.cosine_similarity(h_s[real], h_t[real], dim=-1)).mean().backward()
    torch.testing.assert_close(ours, h_s.grad)
    assert ours[1, 2:].abs().sum() == 0  # padding gets no gradient


def test_padding_does_not_change_the_value_and_scale_does_not_depend_on_length():
    h_s, h_t = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    mask = _mask([4], 4)
    base = masked_hidden_distance(h_s, h_t, mask, "mse")
    padded_s = torch.cat([h_s, 100 * torch.randn(1, 12, 8)], dim=1)
    padded_t = torch.cat([h_t, torch.randn(1, 12, 8)], dim=1)
    padded = masked_hidden_distance(padded_s, padded_t, _mask([4], 16), "mse")
    torch.testing.assert_close(base, padded)
    # Twice the batch of the same rows: the same value (a mean, not a sum).
    doubled = masked_hidden_distance(torch.cat([h_s, h_s]), torch.cat([h_t, h_t]), torch.cat([mask, mask]), "mse")
    torch.testing.assert_close(base, doubled)


def test_projection_only_where_widths_differ_and_it_learns():
    assert HiddenStateDistillation([(1, 1)], 8, 8).projections is None
    module = HiddenStateDistillation([(1, 2), (2, 4)], 4, 8, kind="mse")
    assert len(module.projections) == 2
    before = [p.detach().clone() for p in module.parameters()]
    student, teacher = _hidden(2, 2, 3, 4, seed=2), _hidden(4, 2, 3, 8, seed=3)
    student = tuple(h.float() for h in student)
    teacher = tuple(h.float() for h in teacher)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = module(student, teacher, _mask([3, 2], 3))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert module(student, teacher, _mask([3, 2], 3)) < loss


def test_layer_maps():
    assert parse_layer_map("1:2, 2:4,3:6", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert parse_layer_map("0:0,3:6", 3, 6) == [(0, 0), (3, 6)]
    # A student built from teacher layers 0,2,4 learns from the layers it was copied from.
    assert default_layer_map(3, 6, [0, 2, 4]) == [(1, 1), (2, 3), (3, 5)]
    assert default_layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert default_layer_map(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]


@pytest.mark.parametrize("spec, message", [
    ("4:2", "student has layers 0..3"),
    ("1:7", "teacher has layers 0..6"),
    ("1-2", "STUDENT:TEACHER"),
    ("", "names no layer pair"),
    ("1:2,1:4", "maps a student layer twice"),
])
def test_layer_map_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_map(spec, 3, 6)


# ----------------------------------------------------------------------------- through the trainer

import json  # noqa: E402
import os  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from term_runs import distill_argv, error_of  # noqa: E402
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hidden")
    return {
        "train": write_squad(str(root / "train.json"), make_name_task(24, seed=1, prefix="t")),
        "dev": write_squad(str(root / "dev.json"), make_name_task(8, seed=2, prefix="d")),
        # A 32-wide, 2-layer teacher and a 16-wide, 1-layer student with the same vocabulary.
        "teacher": make_model_folder(str(root / "teacher"), tiny_bert_config(layers=2, dropout=0.0)),
        "narrow": make_model_folder(str(root / "narrow"), tiny_bert_config(layers=1, dropout=0.0, hidden_size=16,
                                                                           intermediate_size=32), seed=1),
    }


def test_alpha_hidden_zero_is_todays_distillation_bit_for_bit(setup, tmp_path):
    from kdqa.config import parse_args
    from kdqa.trainer import train as train_run

    train_run(parse_args(distill_argv(setup, tmp_path / "plain", "--student_layers", "0")))
    train_run(parse_args(distill_argv(setup, tmp_path / "zero", "--student_layers", "0", "--alpha_hidden", "0",
                                      "--hidden_loss", "cosine", "--hidden_layer_map", "1:2")))
    plain, zero = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "zero" /
                                                                                         "model.safetensors"))
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    with open(tmp_path / "zero" / "metrics.jsonl") as f:
        assert all("hidden" not in json.loads(line) for line in f)


def test_hidden_term_trains_a_projection_that_stays_out_of_the_saved_model(setup, tmp_path):
    from kdqa.config import parse_args
    from kdqa.distributed import DistState
    from kdqa import trainer

    args = parse_args(distill_argv(setup, tmp_path / "p", "--model_name_or_path", setup["narrow"],
                                   "--alpha_hidden", "1.0", "--max_steps", "2", "--save_steps", "1"))
    run = trainer.set_up(args, DistState(device=torch.device("cpu")))
    module = run.objective.loss_modules["hidden"]
    assert module.layer_map == [(1, 2)]  # uniform: the student's only layer learns the teacher's last
    assert [tuple(p.shape) for p in module.parameters()] == [(32, 16), (32,)]
    before = [p.detach().clone() for p in module.parameters()]
    trainer.open_metrics_log(run, resumed=False)
    assert trainer.train_loop(run)
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    trainer.finish(run)
    trainer.run_dir.release(args.output_dir)
    saved = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert not any("projection" in k or "loss_modules" in k for k in saved)
    checkpoint = load_file(str(tmp_path / "p" / "checkpoint-2" / "model.safetensors"))
    assert "loss_modules.hidden.projections.0.weight" in checkpoint
    with open(tmp_path / "p" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert all(r["hidden"] > 0 for r in records if "loss" in r)


def test_resume_with_the_hidden_term_is_bit_exact(setup, tmp_path):
    from kdqa.config import parse_args
    from kdqa import trainer

    extra = ("--model_name_or_path", setup["narrow"], "--alpha_hidden", "0.5", "--hidden_loss", "cosine",
             "--max_steps", "4", "--save_steps", "2")
    trainer.train(parse_args(distill_argv(setup, tmp_path / "full", *extra)))
    trainer.INTERRUPT_AFTER_STEP = 2
    try:
        trainer.train(parse_args(distill_argv(setup, tmp_path / "cut", *extra)))
    finally:
        trainer.INTERRUPT_AFTER_STEP = None
    trainer.train(parse_args(distill_argv(setup, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest")))
    full, cut = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_the_cache_and_a_bad_map_are_one_clear_line(setup, tmp_path, capsys):
    message = error_of(distill_argv(setup, tmp_path / "c", "--student_layers", "0", "--alpha_hidden", "1",
                                    "--teacher_logits_cache", str(tmp_path / "cache")), capsys)
    assert "--alpha_hidden needs the teacher's hidden states" in message and "leave out --teacher_logits_cache" in message
    message = error_of(distill_argv(setup, tmp_path / "m", "--student_layers", "0", "--alpha_hidden", "1",
                                    "--hidden_layer_map", "1:5"), capsys)
    assert "--hidden_layer_map '1:5': the teacher has layers 0..2" in message
    assert not os.path.exists(tmp_path / "m" / "model.safetensors")
