"""The attention term (--alpha_attention): value and gradient against a plain formula, padding, errors, resume."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from kdqa.objective import AttentionDistillation, masked_attention_kl
from term_runs import distill_argv, error_of
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad


def _mask(lengths, length):
    return torch.tensor([[1] * n + [0] * (length - n) for n in lengths])


def _attentions(n_layers, mask, heads, seed, padding_value=0.0):
    """Per layer [B, heads, L, L] rows that sum to 1 over the real keys; padded keys hold `padding_value`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        scores = torch.randn(mask.shape[0], heads, mask.shape[1], mask.shape[1], generator=g, dtype=torch.float64)
        probs = torch.softmax(scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf")), dim=-1)
        out.append(torch.where(mask.bool()[:, None, None, :], probs, torch.full_like(probs, padding_value)))
    return tuple(out)


def _plain_kl(a_s, a_t, mask):
    """Query by query and head by head, as the docstring writes it: sum_j t log(t / s) over real keys."""
    total, count = 0.0, 0
    for b in range(a_s.shape[0]):
        real = [j for j in range(a_s.shape[2]) if mask[b, j]]
        for h in range(a_s.shape[1]):
            for i in real:
                total += sum(a_t[b, h, i, j].item() * math.log(a_t[b, h, i, j].item() / a_s[b, h, i, j].item())
                             for j in real)
                count += 1
    return total / count


def test_value_matches_the_plain_formula():
    mask = _mask([6, 4], 6)
    student, teacher = _attentions(3, mask, 2, seed=0), _attentions(6, mask, 2, seed=1)
    pairs = [(1, 2), (2, 4), (3, 6)]
    term = AttentionDistillation(pairs, 2, 2)(student, teacher, mask)
    expected = sum(_plain_kl(student[s - 1], teacher[t - 1], mask) for s, t in pairs) / len(pairs)
    assert term.item() == pytest.approx(expected, rel=1e-9)
    assert AttentionDistillation([(1, 1)], 2, 2)(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_matches_autograd_of_the_plain_formula():
    mask = _mask([5, 3], 5)
    scores = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    teacher = _attentions(1, mask, 2, seed=3)[0]
    student = torch.softmax(scores.masked_fill(~mask.bool()[:, None, None, :], -1e4), dim=-1)
    masked_attention_kl(student, teacher, mask).backward()
    ours = scores.grad.clone()
    scores.grad = None
    # The same quantity without masks: each example's real block only, KL per row, mean over rows.
    rows = []
    for b, n in enumerate([5, 3]):
        s = torch.softmax(scores[b, :, :n, :n], dim=-1)
        t = teacher[b, :, :n, :n]
        rows.append((t * (t.log() - s.log())).sum(-1).flatten())
    torch.cat(rows).mean().backward()
    torch.testing.assert_close(ours, scores.grad)
    assert ours[1, :, 3:].abs().sum() == 0  # padding queries get no gradient


def test_padding_is_excluded_and_the_scale_does_not_depend_on_batch_or_length():
    mask = _mask([4], 4)
    student, teacher = _attentions(1, mask, 2, seed=4)[0], _attentions(1, mask, 2, seed=5)[0]
    base = masked_attention_kl(student, teacher, mask)
    # Pad to 10 tokens: padding queries hold garbage rows, padding keys a probability that is not 0.
    long_mask = _mask([4], 10)
    padded_s = torch.rand(1, 2, 10, 10, dtype=torch.float64)
    padded_t = torch.rand(1, 2, 10, 10, dtype=torch.float64)
    padded_s[..., :4, :4], padded_t[..., :4, :4] = student, teacher
    torch.testing.assert_close(masked_attention_kl(padded_s, padded_t, long_mask), base)
    doubled = masked_attention_kl(torch.cat([student, student]), torch.cat([teacher, teacher]),
                                  torch.cat([mask, mask]))
    torch.testing.assert_close(doubled, base)


def test_heads_that_differ_and_layer_zero_are_refused():
    with pytest.raises(ValueError, match="the student has 4 heads per layer and the teacher 2"):
        AttentionDistillation([(1, 1)], 4, 2)
    with pytest.raises(ValueError, match="layer 0 is the embedding output, which has no attention"):
        AttentionDistillation([(0, 0), (1, 2)], 2, 2)


# ----------------------------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {
        "train": write_squad(str(root / "train.json"), make_name_task(24, seed=1, prefix="t")),
        "dev": write_squad(str(root / "dev.json"), make_name_task(8, seed=2, prefix="d")),
        "teacher": make_model_folder(str(root / "teacher"), tiny_bert_config(layers=2, dropout=0.0)),
        "four_heads": make_model_folder(str(root / "four"), tiny_bert_config(layers=1, dropout=0.0, hidden_size=16,
                                                                             intermediate_size=32,
                                                                             num_attention_heads=4), seed=1),
    }


def test_alpha_attention_zero_is_todays_distillation_bit_for_bit(setup, tmp_path):
    from kdqa.config import parse_args
    from kdqa.trainer import train as train_run

    train_run(parse_args(distill_argv(setup, tmp_path / "plain", "--student_layers", "0")))
    train_run(parse_args(distill_argv(setup, tmp_path / "zero", "--student_layers", "0", "--alpha_attention", "0",
                                      "--attention_layer_map", "1:2")))
    plain, zero = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "zero"))
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    with open(tmp_path / "zero" / "metrics.jsonl") as f:
        assert all("attention" not in json.loads(line) for line in f)


def test_the_attention_term_trains_in_eager_attention_and_is_logged(setup, tmp_path, caplog):
    from kdqa import trainer
    from kdqa.config import parse_args
    from kdqa.distributed import DistState

    argv = ("--student_layers", "0", "--alpha_attention", "2.0")
    first = parse_args(distill_argv(setup, tmp_path / "set_up", *argv))
    run = trainer.set_up(first, DistState(device=torch.device("cpu")))
    assert run.objective.weights == {"ce": 0.5, "kd": 0.5, "attention": 2.0}
    assert run.objective.loss_modules["attention"].layer_map == [(1, 1)]  # the layer --student_layers 0 copied
    assert run.student.config._attn_implementation == "eager" and run.teacher.config._attn_implementation == "eager"
    assert not run.objective.has_trainable_parts()  # nothing to train: checkpoints as before
    trainer.run_dir.release(first.output_dir)
    with caplog.at_level("INFO", logger="kdqa"):
        trainer.train(parse_args(distill_argv(setup, tmp_path / "a", *argv)))
    assert ("attention term: 2 x KL(teacher ‖ student) of the attention probabilities, per head "
            "(layer map (student:teacher): 1:1)") in caplog.text
    assert "student and teacher run eager attention" in caplog.text
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    logged = [r["attention"] for r in records if "loss" in r]
    # Step 1: the student's layer is the teacher's own copy, so the KL is zero up to rounding (its
    # sign is the CPU's); once the student has moved, the term is positive.
    assert abs(logged[0]) < 1e-6 and len(logged) > 1 and all(value > 0 for value in logged[1:]), logged
    plain = parse_args(distill_argv(setup, tmp_path / "b", "--student_layers", "0"))
    student, teacher, _ = trainer.load_student_and_teacher(plain, DistState(device=torch.device("cpu")))
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


def test_resume_with_the_attention_term_is_bit_exact(setup, tmp_path):
    from kdqa import trainer
    from kdqa.config import parse_args

    extra = ("--student_layers", "0", "--alpha_attention", "1.0", "--alpha_hidden", "0.5", "--max_steps", "4",
             "--save_steps", "2")
    trainer.train(parse_args(distill_argv(setup, tmp_path / "full", *extra)))
    trainer.INTERRUPT_AFTER_STEP = 2
    try:
        trainer.train(parse_args(distill_argv(setup, tmp_path / "cut", *extra)))
    finally:
        trainer.INTERRUPT_AFTER_STEP = None
    trainer.train(parse_args(distill_argv(setup, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest")))
    full, cut = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    with open(tmp_path / "full" / "metrics.jsonl") as f, open(tmp_path / "cut" / "metrics.jsonl") as g:
        assert [json.loads(line) for line in f][-1]["attention"] == [json.loads(line) for line in g][-1]["attention"]


def test_errors_are_one_clear_line(setup, tmp_path, capsys):
    message = error_of(distill_argv(setup, tmp_path / "c", "--student_layers", "0", "--alpha_attention", "1",
                                    "--teacher_logits_cache", str(tmp_path / "cache")), capsys)
    assert message.endswith("--alpha_attention needs the teacher's attention probabilities, which "
                            "--teacher_logits_cache does not hold (it stores logits only): leave out "
                            "--teacher_logits_cache so the teacher runs online, or set --alpha_attention 0")
    message = error_of(distill_argv(setup, tmp_path / "m", "--student_layers", "0", "--alpha_attention", "1",
                                    "--attention_layer_map", "1:5"), capsys)
    assert "--attention_layer_map '1:5': the teacher has layers 0..2" in message
    message = error_of(distill_argv(setup, tmp_path / "h", "--alpha_attention", "1", "--model_name_or_path",
                                    setup["four_heads"]), capsys)
    assert "the student has 4 heads per layer and the teacher 2" in message
    message = error_of(distill_argv(setup, tmp_path / "n", "--student_layers", "0", "--alpha_attention", "-1"), capsys)
    assert "--alpha_attention" in message
    message = error_of(distill_argv(setup, tmp_path / "z", "--student_layers", "0", "--alpha_attention", "1",
                                    "--attention_layer_map", "0:0"), capsys)
    assert "--attention_layer_map '0:0': layer 0 is the embedding output, which has no attention" in message
    assert not any(os.path.exists(tmp_path / d / "model.safetensors") for d in "cmhnz")
