"""The objective (kdqa/objective.py): named model outputs, and the rules that follow from each term's needs.

A term registered in objective.EXTRA_TERMS alone must reach the models' requested outputs, the loss,
its weight, the log, the checkpoint, the cache refusal and the recipe's choice of cache.
"""

import argparse

import pytest
import torch

from kdqa import objective, trainer
from kdqa.config import ConfigError, parse_args
from kdqa.distributed import DistState
from kdqa.hidden_distill import choose_layer_map
from kdqa.loss import qa_distillation_loss
from kdqa.modeling import QAOutputs, forward_qa, load_qa_model
from tiny_models import make_model_folder, tiny_bert_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("objective") / "m"), tiny_bert_config(layers=2, dropout=0.0))


def _batch(lengths, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * n + [0] * (length - n) for n in lengths])
    return {"input_ids": torch.randint(6, 60, (len(lengths), length), generator=g) * mask,
            "attention_mask": mask, "token_type_ids": torch.zeros_like(mask),
            "start_positions": torch.tensor([1] * len(lengths)), "end_positions": torch.tensor([2] * len(lengths))}


def test_forward_qa_returns_what_is_asked_by_name(model_dir):
    model = load_qa_model(model_dir, attn_implementation="eager").eval()
    batch = _batch([12, 7])
    with torch.no_grad():
        plain = forward_qa(model, batch)
        full = forward_qa(model, batch, {"hidden_states", "attentions"})
    assert isinstance(plain, QAOutputs) and plain.hidden_states is None and plain.attentions is None
    assert len(full.hidden_states) == 3 and full.hidden_states[0].shape == (2, 12, 32)  # embeddings + 2 layers
    assert len(full.attentions) == 2 and full.attentions[0].shape == (2, 2, 12, 12)  # [B, heads, L, L]
    assert torch.equal(plain.start, full.start) and torch.equal(plain.end, full.end)
    assert plain.logits == (plain.start, plain.end)
    with pytest.raises(ValueError, match="not \\['logits2'\\]"):
        forward_qa(model, batch, {"logits2"})
    sdpa = load_qa_model(model_dir, attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        forward_qa(sdpa, batch, {"attentions"})


class _Probe(torch.nn.Module):
    """A stand-in term with a trainable part: scale * mean of the student's last attention layer."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, student, teacher, attention_mask):
        assert teacher is not None and len(student) == len(teacher)
        return self.scale * student[-1].float().mean()

    def describe(self):
        return {"what": "a probe", "scale": round(float(self.scale.detach()), 3)}


PROBE = objective.Term("probe", "alpha_probe", "attentions", lambda args, s, t: _Probe())


@pytest.fixture
def with_probe(monkeypatch):
    monkeypatch.setattr(objective, "EXTRA_TERMS", (*objective.EXTRA_TERMS, PROBE))


def _distill_args(model_dir, tmp_path, *extra, probe=1.5):
    args = parse_args(["distill", "--teacher_model_name_or_path", model_dir, "--model_name_or_path", model_dir,
                       "--output_dir", str(tmp_path), "--loss_impl", "torch", *extra])
    args.alpha_probe = probe
    return args


def test_rules_follow_from_the_terms_needs(with_probe, model_dir, tmp_path):
    args = _distill_args(model_dir, tmp_path)
    assert objective.needs_teacher_internals(args) and objective.attn_implementation(args) == "eager"
    assert objective.cache_conflict(args) is None  # no cache asked for
    args.teacher_logits_cache = str(tmp_path / "cache")
    assert objective.cache_conflict(args) == (
        "--alpha_probe needs the teacher's attention probabilities, which --teacher_logits_cache does not hold (it "
        "stores logits only): leave out --teacher_logits_cache so the teacher runs online, or set --alpha_probe 0")
    off = _distill_args(model_dir, tmp_path, "--teacher_logits_cache", str(tmp_path / "cache"), probe=0.0)
    assert not objective.needs_teacher_internals(off) and objective.cache_conflict(off) is None
    assert objective.attn_implementation(off) == "sdpa"
    finetune = argparse.Namespace(**{**vars(args), "mode": "finetune"})
    assert objective.attn_implementation(finetune) == "sdpa"  # no teacher: no attention term, no eager


def test_the_cache_refusal_is_one_rule_for_config_and_recipe(tmp_path):
    from kdqa import recipe

    common = ["--teacher_model_name_or_path", "t", "--model_name_or_path", "s", "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="--alpha_hidden needs the teacher's hidden states"):
        parse_args(["distill", *common, "--alpha_hidden", "1", "--teacher_logits_cache", str(tmp_path / "c")])
    # The recipe's stages use a cache exactly where the objective lets them: the logits-only row
    # always, the row with teacher internals never.
    stages = recipe.stage_arguments(parse_args(["recipe", *common, "--alpha_hidden", "1"]))
    for stage in stages.values():
        assert objective.cache_conflict(stage) is None
    assert stages["distilled student"].teacher_logits_cache is not None
    assert stages[recipe.HIDDEN_STAGE].teacher_logits_cache is None


def test_a_registered_term_reaches_the_loss_the_log_and_the_checkpoint(with_probe, model_dir, tmp_path):
    args = _distill_args(model_dir, tmp_path)
    student = load_qa_model(model_dir, attn_implementation=objective.attn_implementation(args))
    teacher = load_qa_model(model_dir, attn_implementation=objective.attn_implementation(args)).eval()
    run = trainer.make_run(args, DistState(), student, teacher, autocast_dtype=None, use_scaler=False,
                           total_steps=2)
    assert run.objective.weights == {"ce": args.alpha_ce, "kd": args.alpha_kd, "probe": 1.5}
    assert run.objective.needs == {"attentions"}
    probe = run.objective.loss_modules["probe"]
    assert any(p is probe.scale for p in run.trainable_parameters())
    assert "loss_modules.probe.scale" in trainer.checkpointed_model(run).state_dict()
    description = run.objective.describe()
    assert description["terms"][-1] == {"name": "probe", "weight": 1.5, "what": "a probe", "scale": 0.5}
    assert description["formula"] == "0.5·CE + 0.5·T²·KL + 1.5·probe"
    assert objective.plan_lines(description)[0] == "probe term: 1.5 x a probe (scale: 0.5)"
    assert "eager attention" in objective.plan_lines(description)[1]

    batch = _batch([12, 5])
    torch.manual_seed(0)
    terms = trainer.forward_backward(run, batch)
    assert probe.scale.grad is not None and probe.scale.grad != 0
    student.zero_grad()
    torch.manual_seed(0)
    s_out = forward_qa(student, batch, {"attentions"})
    with torch.no_grad():
        t_out = forward_qa(teacher, batch)
    span = qa_distillation_loss(s_out.start, s_out.end, batch["start_positions"], batch["end_positions"],
                                t_out.start, t_out.end, mask=batch["attention_mask"].bool(), temperature=2.0,
                                alpha_ce=0.5, alpha_kd=0.5, impl="torch")
    expected_probe = 0.5 * s_out.attentions[-1].mean()
    torch.testing.assert_close(terms["probe"], expected_probe.detach())
    torch.testing.assert_close(terms["loss"], (span.loss + 1.5 * expected_probe).detach())
    assert set(terms) == {"loss", "ce", "kd", "probe"}


def test_the_hidden_layer_map_takes_plain_arguments():
    assert choose_layer_map(None, 3, 6, copied=[0, 2, 4]) == [(1, 1), (2, 3), (3, 5)]
    assert choose_layer_map(None, 3, 6, copied=[0, 2, 9]) == [(1, 2), (2, 4), (3, 6)]  # not this teacher's: uniform
    assert choose_layer_map("1:6", 3, 6, copied=[0, 2, 4]) == [(1, 6)]  # a given map wins
    with pytest.raises(ValueError, match="^--some_map '1:9': the teacher has layers 0..6"):
        choose_layer_map("1:9", 3, 6, flag="--some_map")
