"""The relation term (--alpha_relation, MiniLMv2): value and gradient against a formula written here,
padding, other widths and head counts, errors, the hooks through the trainer, resume."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from kdqa.model_adapter import Capture
from kdqa.modeling import forward_qa, load_qa_model
from kdqa.relation_distill import RelationDistillation, relation_kl
from term_runs import distill_argv, error_of
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad


def _mask(lengths, length):
    return torch.tensor([[1] * n + [0] * (length - n) for n in lengths])


def _plain_relation_kl(student, teacher, mask, heads):
    """Example by example, head by head, query by query over the real tokens only, as MiniLMv2 writes it."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        n = int(mask[b].sum())
        for r in range(heads):
            def relation(x):
                d = x.shape[-1] // heads
                part = x[b, :n, r * d:(r + 1) * d].double()
                return torch.softmax(part @ part.T / math.sqrt(d), dim=-1)
            s, t = relation(student), relation(teacher)
            for i in range(n):
                total += sum(t[i, j].item() * math.log(t[i, j].item() / s[i, j].item()) for j in range(n))
                count += 1
    return total / count


def test_value_matches_the_plain_formula_for_other_widths_and_heads():
    mask = _mask([6, 4], 6)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 12, generator=g)
    for heads in (1, 2, 4):  # neither model's width: 8 and 12 features split into the same relation heads
        assert relation_kl(student, teacher, mask, heads).item() == pytest.approx(
            _plain_relation_kl(student, teacher, mask, heads), rel=1e-5)
    assert relation_kl(teacher, teacher, mask, 3).item() == pytest.approx(0.0, abs=1e-6)


def test_padding_is_excluded_and_gets_no_gradient():
    mask = _mask([4], 4)
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    base = relation_kl(student, teacher, mask, 2)
    long_s = torch.cat([student, 50 * torch.randn(1, 6, 8, generator=g)], dim=1).requires_grad_()
    long_t = torch.cat([teacher, 50 * torch.randn(1, 6, 8, generator=g)], dim=1)
    padded = relation_kl(long_s, long_t, _mask([4], 10), 2)
    torch.testing.assert_close(padded, base)
    padded.backward()
    assert long_s.grad[:, 4:].abs().sum() == 0 and long_s.grad[:, :4].abs().sum() > 0
    doubled = relation_kl(torch.cat([student, student]), torch.cat([teacher, teacher]), torch.cat([mask, mask]), 2)
    torch.testing.assert_close(doubled, base)  # its scale depends neither on batch size nor on padded length


def test_gradient_matches_autograd_of_the_plain_formula():
    mask = _mask([5, 3], 5)
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    relation_kl(student, teacher, mask, 3).backward()
    ours, student.grad = student.grad.clone(), None
    rows = []
    for b, n in enumerate([5, 3]):
        for r in range(3):
            s, t = student[b, :n, 2 * r:2 * r + 2], teacher[b, :n, 2 * r:2 * r + 2]
            log_s = torch.log_softmax(s @ s.T / math.sqrt(2), -1)
            p_t = torch.softmax(t @ t.T / math.sqrt(2), -1)
            rows.append((p_t * (p_t.log() - log_s)).sum(-1))
    torch.cat(rows).mean().backward()
    torch.testing.assert_close(ours, student.grad)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("relation")
    return {
        "train": write_squad(str(root / "train.json"), make_name_task(24, seed=1, prefix="t")),
        "dev": write_squad(str(root / "dev.json"), make_name_task(8, seed=2, prefix="d")),
        "teacher": make_model_folder(str(root / "teacher"), tiny_bert_config(layers=2, dropout=0.0)),
        # narrower (16 vs 32) with other heads (4 vs 2): where attention transfer is refused
        "narrow": make_model_folder(str(root / "narrow"), tiny_bert_config(layers=1, dropout=0.0, hidden_size=16,
                                                                          intermediate_size=32,
                                                                          num_attention_heads=4), seed=1),
    }


def test_the_module_reads_the_queries_keys_and_values_its_hooks_recorded(setup):
    student, teacher = load_qa_model(setup["narrow"]).eval(), load_qa_model(setup["teacher"]).eval()
    term = RelationDistillation([(1, 2)], student, teacher)
    assert term.relation_heads == 2 and [(tap.what, tap.layers) for tap in term.teacher_taps] == [
        ("query", (1,)), ("key", (1,)), ("value", (1,))]
    mask = _mask([7, 5], 7)
    batch = {"input_ids": torch.randint(6, 60, (2, 7)) * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros_like(mask)}
    with Capture(student, term.student_taps) as s_capture, Capture(teacher, term.teacher_taps) as t_capture:
        s_out, t_out = forward_qa(student, batch, capture=s_capture), forward_qa(teacher, batch, capture=t_capture)
    value = term(s_out.captured, t_out.captured, mask)
    # The same from the projections applied by hand to the layers' inputs (the formula, not the hooks).
    s_in = student.bert(**batch, output_hidden_states=True).hidden_states[0]
    t_in = teacher.bert(**batch, output_hidden_states=True).hidden_states[1]
    s_attn, t_attn = student.bert.encoder.layer[0].attention.self, teacher.bert.encoder.layer[1].attention.self
    expected = sum(relation_kl(getattr(s_attn, p)(s_in), getattr(t_attn, p)(t_in), mask, 2)
                   for p in ("query", "key", "value")) / 3
    torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError, match="--relation_heads 3 must divide the query/key/value widths of student and "
                                         "teacher \\(16, 32\\)"):
        RelationDistillation([(1, 2)], student, teacher, 3)
    with pytest.raises(ValueError, match="layer 0 is the embedding output, which has no queries"):
        RelationDistillation([(0, 0)], student, teacher)


def test_alpha_relation_zero_is_todays_distillation_bit_for_bit(setup, tmp_path):
    from kdqa.config import parse_args
    from kdqa.trainer import train as train_run

    train_run(parse_args(distill_argv(setup, tmp_path / "plain", "--student_layers", "0")))
    train_run(parse_args(distill_argv(setup, tmp_path / "zero", "--student_layers", "0", "--alpha_relation", "0")))
    plain, zero = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "zero"))
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)


def test_a_narrow_student_learns_the_relations_and_resumes_bit_exact(setup, tmp_path, caplog):
    from kdqa import trainer
    from kdqa.config import parse_args

    extra = ("--model_name_or_path", setup["narrow"], "--alpha_relation", "2.0", "--max_steps", "4",
             "--save_steps", "2")
    with caplog.at_level("INFO", logger="kdqa"):
        trainer.train(parse_args(distill_argv(setup, tmp_path / "full", *extra)))
    assert "relation term: 2 x KL(teacher ‖ student) of the query-query, key-key and value-value relations " \
           "(MiniLMv2) (relation heads: 2; layer map (student:teacher): 1:2)" in caplog.text
    trainer.INTERRUPT_AFTER_STEP = 2
    try:
        trainer.train(parse_args(distill_argv(setup, tmp_path / "cut", *extra)))
    finally:
        trainer.INTERRUPT_AFTER_STEP = None
    trainer.train(parse_args(distill_argv(setup, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest")))
    full, cut = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    with open(tmp_path / "full" / "metrics.jsonl") as f, open(tmp_path / "cut" / "metrics.jsonl") as g:
        full_log, cut_log = [json.loads(line) for line in f], [json.loads(line) for line in g]
    timing = ("features_per_second", "peak_memory_mb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in full_log] == \
           [{k: v for k, v in r.items() if k not in timing} for r in cut_log]
    assert all(r["relation"] > 0 for r in full_log if "loss" in r)
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["objective"]["formula"] == "0.5·CE + 0.5·T²·KL + 2·relation"


def test_errors_are_one_clear_line(setup, tmp_path, capsys):
    message = error_of(distill_argv(setup, tmp_path / "c", "--alpha_relation", "1", "--student_layers", "0",
                                    "--teacher_logits_cache", str(tmp_path / "cache")), capsys)
    assert message.endswith("--alpha_relation needs the teacher's queries, keys and values, which "
                            "--teacher_logits_cache does not hold (it stores logits only): leave out "
                            "--teacher_logits_cache so the teacher runs online, or set --alpha_relation 0")
    message = error_of(distill_argv(setup, tmp_path / "m", "--student_layers", "0", "--alpha_relation", "1", "--relation_layer_map", "1:5"),
                       capsys)
    assert "--relation_layer_map '1:5': the teacher has layers 0..2" in message
    message = error_of(distill_argv(setup, tmp_path / "h", "--student_layers", "0", "--alpha_relation", "1", "--relation_heads", "0"), capsys)
    assert "--relation_heads must be at least 1, got 0" in message
    message = error_of(distill_argv(setup, tmp_path / "n", "--student_layers", "0", "--alpha_relation", "-1"), capsys)
    assert "--alpha_relation must be >= 0" in message
    message = error_of(distill_argv(setup, tmp_path / "w", "--alpha_relation", "1", "--relation_heads", "3",
                                    "--model_name_or_path", setup["narrow"]), capsys)
    assert "--relation_heads 3 must divide" in message
    assert not any(os.path.exists(tmp_path / d / "model.safetensors") for d in "cmhnw")
