"""The model adapter (kdqa/model_adapter.py): named parts per architecture family, and the hooks that
record what transformers does not return, checked on a tiny model of each family built from a config.

The parts are checked against the arithmetic they must satisfy, written here: the captured queries
and keys give the model's own attention probabilities, those probabilities times the captured values
give the captured context, the captured FFN activation is GELU of the captured FFN input.
"""

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from kdqa.model_adapter import (TAPS, Capture, ModelAdapter, Tap, UnsupportedModelError, taps)
from kdqa.modeling import build_student_from_layers, encoder_layers, forward_qa
from kdqa.trainer import enable_gradient_checkpointing
from tiny_models import TINY_FAMILY_CONFIGS, tiny_qa_model

FAMILIES = sorted(TINY_FAMILY_CONFIGS)

# Each family's layer i and its projections, spelled out here (not read from the adapter's table).
LAYERS = {"bert": lambda m: m.bert.encoder.layer, "roberta": lambda m: m.roberta.encoder.layer,
          "xlm-roberta": lambda m: m.roberta.encoder.layer, "electra": lambda m: m.electra.encoder.layer,
          "distilbert": lambda m: m.distilbert.transformer.layer}
EMBEDDINGS = {"bert": lambda m: m.bert.embeddings, "roberta": lambda m: m.roberta.embeddings,
              "xlm-roberta": lambda m: m.roberta.embeddings, "electra": lambda m: m.electra.embeddings,
              "distilbert": lambda m: m.distilbert.embeddings}


def parts_of(model_type, layer):
    """query, key, value, attention output, FFN in, FFN out of one layer, by the family's own names."""
    if model_type == "distilbert":
        return (layer.attention.q_lin, layer.attention.k_lin, layer.attention.v_lin, layer.attention.out_lin,
                layer.ffn.lin1, layer.ffn.lin2)
    return (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
            layer.attention.output.dense, layer.intermediate.dense, layer.output.dense)


def _batch(lengths=(12, 7), length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * n + [0] * (length - n) for n in lengths])
    return {"input_ids": torch.randint(6, 60, (len(lengths), length), generator=g) * mask + 1 - mask,
            "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}


def _heads(x, heads):
    """[B, L, heads * d] -> [B, heads, L, d]"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_adapter_names_each_familys_parts(model_type):
    model = tiny_qa_model(model_type, layers=3)
    adapter = ModelAdapter(model)
    assert adapter.layers is LAYERS[model_type](model) and adapter.num_layers == 3
    assert adapter.embeddings is EMBEDDINGS[model_type](model)
    assert (adapter.num_heads, adapter.head_size, adapter.hidden_size) == (2, 16, 32)
    for i in range(3):
        expected = parts_of(model_type, LAYERS[model_type](model)[i])
        named = (*adapter.attention(i), *adapter.ffn(i))
        assert all(a is b for a, b in zip(named, expected, strict=True))
        assert all(isinstance(p, torch.nn.Linear) for p in named)
        assert adapter.ffn(i).input.out_features == 64 and adapter.ffn(i).output.in_features == 64
    ddp_like = torch.nn.Module()
    ddp_like.module = model  # DDP's .module (torch.compile's ._orig_mod is unwrapped the same way)
    assert ModelAdapter(ddp_like).layers is adapter.layers
    assert encoder_layers(model) is adapter.layers  # modeling finds layers through the adapter


@pytest.mark.parametrize("model_type", FAMILIES)
def test_captured_projections_are_the_attention_and_ffn_the_model_computes(model_type):
    model = tiny_qa_model(model_type, layers=2).eval()
    layer = LAYERS[model_type](model)[1]
    query, key, value, out, ffn_in, ffn_out = parts_of(model_type, layer)
    seen_input = {}
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen_input.update(x=args[0] if args else
                                                                                         kwargs["hidden_states"]),
                                             with_kwargs=True)
    batch = _batch()
    with Capture(model, taps(TAPS, [1])) as capture, torch.no_grad():
        out_qa = forward_qa(model, batch, {"attentions", "hidden_states"}, capture=capture)
    handle.remove()
    c = {what: out_qa.captured[what, 1] for what in TAPS}
    x = seen_input["x"]
    torch.testing.assert_close(x, out_qa.hidden_states[1])  # the layer's input is the previous layer's output
    for what, linear in (("query", query), ("key", key), ("value", value)):
        torch.testing.assert_close(c[what], F.linear(x, linear.weight, linear.bias))
    q, k, v = (_heads(c[what], 2) for what in ("query", "key", "value"))
    keys = batch["attention_mask"][:, None, None, :].bool()
    probs = (q @ k.transpose(-1, -2) / math.sqrt(16)).masked_fill(~keys, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, out_qa.attentions[1])  # the model's own attention probabilities
    context = (probs @ v).transpose(1, 2).reshape(c["attention_context"].shape)
    torch.testing.assert_close(c["attention_context"], context)
    torch.testing.assert_close(c["attention_output"], F.linear(context, out.weight, out.bias))
    torch.testing.assert_close(c["ffn_activation"], F.gelu(c["ffn_in"]))
    torch.testing.assert_close(c["ffn_out"], F.linear(c["ffn_activation"], ffn_out.weight, ffn_out.bias))
    assert c["ffn_in"].shape == (2, 12, 64)


def test_capture_returns_the_declared_layers_only_and_nothing_without_taps():
    model = tiny_qa_model("bert", layers=3).eval()
    batch = _batch()
    with torch.no_grad():
        plain = forward_qa(model, batch)
        with Capture(model, [Tap("query", (2,)), Tap("ffn_activation", (0, 2))]) as capture:
            hooked = forward_qa(model, batch, capture=capture)
        with Capture(model, ()) as empty:
            assert not empty._handles  # nothing declared: no hook registered
            nothing = forward_qa(model, batch, capture=empty)
    assert set(hooked.captured) == {("query", 2), ("ffn_activation", 0), ("ffn_activation", 2)}
    assert plain.captured == {} and nothing.captured == {}
    for out in (hooked, nothing):  # hooks change nothing the model computes
        assert torch.equal(out.start, plain.start) and torch.equal(out.end, plain.end)
    assert all(not m._forward_hooks for m in model.modules())  # removed on leaving the with block


def test_captures_are_cleared_between_forwards_and_kept_by_no_one():
    model = tiny_qa_model("distilbert", layers=2)
    capture = Capture(model, taps(("query", "ffn_activation"), [0, 1]))
    first = forward_qa(model, _batch((12, 7), length=12), capture=capture)
    gone = weakref.ref(first.captured["query", 0])
    second = forward_qa(model, _batch((5,), length=5), capture=capture)
    assert all(t.shape[:2] == (1, 5) for t in second.captured.values())  # this batch's, not the last one's
    assert capture._seen == {}  # handed over: the capture holds no tensor between steps
    del first
    gc.collect()
    assert gone() is None  # nothing else kept the first step's tensor (and its graph) alive
    with torch.no_grad():
        model(**{k: v for k, v in _batch().items() if k != "token_type_ids"})  # a forward outside forward_qa
    assert capture._seen == {}  # records nothing (evaluation, checkpointing's recomputation)
    assert forward_qa(model, _batch()).captured == {}  # no capture passed: nothing returned
    capture.remove()
    assert all(not m._forward_hooks for m in model.modules())


def _grads_of_a_loss_on_captured_tensors(model, checkpointing: bool):
    """The gradients of a loss on layer 1's captured queries and layer 0's FFN activations, and how
    often layer 1's query projection ran (twice under checkpointing: again during backward)."""
    if checkpointing:
        enable_gradient_checkpointing(model)  # what --gradient_checkpointing does
    model.train()
    calls = []
    counter = ModelAdapter(model).attention(1).query.register_forward_hook(lambda *_: calls.append(1))
    with Capture(model, [Tap("query", (1,)), Tap("ffn_activation", (0,))]) as capture:
        out = forward_qa(model, _batch(), capture=capture)
        assert capture._seen == {}
        loss = out.captured["query", 1].pow(2).mean() + out.captured["ffn_activation", 0].mean()
        loss.backward()  # with checkpointing, the layers run again here: the hooks record nothing then
        assert capture._seen == {}
    counter.remove()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradients_flow_through_captured_tensors_with_and_without_checkpointing(model_type):
    """transformers' non-reentrant checkpointing (kdqa's --gradient_checkpointing) gives the same gradients."""
    model = tiny_qa_model(model_type, layers=2)
    adapter = ModelAdapter(model)
    grads, calls = _grads_of_a_loss_on_captured_tensors(model, checkpointing=False)
    name_of = {p: n for n, p in model.named_parameters()}
    query_1, ffn_0 = name_of[adapter.attention(1).query.weight], name_of[adapter.ffn(0).input.weight]
    key_1 = name_of[adapter.attention(1).key.weight]
    assert grads[query_1].abs().sum() > 0 and grads[ffn_0].abs().sum() > 0
    assert key_1 not in grads or grads[key_1].abs().sum() == 0  # the loss does not reach layer 1's keys
    model.zero_grad(set_to_none=True)
    checkpointed, calls_checkpointed = _grads_of_a_loss_on_captured_tensors(model, checkpointing=True)
    assert (calls, calls_checkpointed) == (1, 2)  # checkpointing was on: layer 1 was recomputed in backward
    assert checkpointed.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name])


def test_an_unsupported_family_or_tap_is_refused_in_one_line():
    from transformers import AlbertConfig, AlbertForQuestionAnswering

    albert = AlbertForQuestionAnswering(AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64))
    for build in (lambda: ModelAdapter(albert), lambda: Capture(albert, [Tap("query", (0,))])):
        with pytest.raises(UnsupportedModelError) as err:
            build()
        assert "\n" not in str(err.value)
        assert "'albert'" in str(err.value) and "bert, distilbert, electra, roberta, xlm-roberta" in str(err.value)
    assert Capture(albert, ()).keys == ()  # declaring nothing asks nothing of the model
    renamed = tiny_qa_model("bert", layers=2)
    renamed.bert.encoder.layer[0].attention.self = torch.nn.Identity()  # as if transformers renamed a module
    with pytest.raises(UnsupportedModelError, match=r"^the bert model \(BertForQuestionAnswering\) has no module "
                                                   r"'encoder.layer.0.attention.self.query', where kdqa's model adapter"):
        ModelAdapter(renamed)
    model = tiny_qa_model("bert", layers=2)
    out_of_range = r"^layer 2 is out of range: the bert model has encoder layers 0\.\.1$"
    with pytest.raises(UnsupportedModelError, match=out_of_range):
        Capture(model, [Tap("query", (0,)), Tap("key", (2,))])
    assert all(not m._forward_hooks for m in model.modules())  # a refused declaration leaves no hook
    with pytest.raises(UnsupportedModelError, match=r"^cannot record keys: the adapter records query, key, "):
        Capture(model, [Tap("keys", (0,))])


def test_student_layers_still_build_for_an_adapted_family_and_an_unadapted_one():
    """encoder_layers asks the adapter; families it does not know keep the name rule (DeBERTa-v2)."""
    from transformers import DebertaV2Config, DebertaV2ForQuestionAnswering

    for teacher in (tiny_qa_model("roberta", layers=3), DebertaV2ForQuestionAnswering(DebertaV2Config(
            vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))):
        student = build_student_from_layers(teacher, [0, 2])
        assert len(encoder_layers(student)) == 2
        torch.testing.assert_close(dict(encoder_layers(student)[1].named_parameters()),
                                   dict(encoder_layers(teacher)[2].named_parameters()))


def test_capture_under_torch_compile_records_what_the_eager_model_does():
    """--torch_compile wraps the student; the capture's hooks sit on the raw model's projections and
    dynamo traces them (aot_eager: dynamo and AOT autograd, no code generation, to stay fast)."""
    model = tiny_qa_model("bert", layers=2)
    compiled = torch.compile(model, backend="aot_eager")
    with Capture(model, taps(("query", "ffn_activation"), [1])) as capture:
        eager = forward_qa(model, _batch(), capture=capture)
        out = forward_qa(compiled, _batch(), capture=capture)
        assert set(out.captured) == set(eager.captured) == {("query", 1), ("ffn_activation", 1)}
        for key in eager.captured:
            torch.testing.assert_close(out.captured[key], eager.captured[key])
        out.captured["query", 1].pow(2).mean().backward()
        assert ModelAdapter(model).attention(1).query.weight.grad.abs().sum() > 0
        with torch.no_grad():
            forward_qa(compiled, _batch())  # no capture passed: records nothing
        assert capture._seen == {}
