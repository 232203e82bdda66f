"""Named access to a QA model's insides, per architecture family, and forward hooks that record them.

transformers returns hidden states and attention probabilities; MiniLMv2's relations (queries, keys,
values), FFN activations and structured pruning's importance scores need the sub-modules themselves.
`ModelAdapter(model)` names them (embeddings, encoder layers, each layer's attention query/key/value/
output projections and FFN in/out projections, head count and size, hidden size) from a table of
families keyed by `config.model_type`, not by guessing names. A loss term declares what it needs as
`Tap`s; `Capture(model, taps)` registers forward hooks once, and kdqa.modeling.forward_qa(...,
capture=...) returns what they saw for that batch (QAOutputs.captured). Encoder layers count from 0
here, as in the model's ModuleList and --student_layers (the layer maps count the embeddings as 0).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch


class UnsupportedModelError(ValueError):
    """A model whose architecture family the adapter has no entry for, or a tap it cannot record."""


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its parts: `embeddings` and `layers` below the base model
    (model.base_model), the projections (nn.Linear) below one encoder layer."""
    name: str
    embeddings: str
    layers: str
    query: str
    key: str
    value: str
    attention_output: str
    ffn_in: str
    ffn_out: str


BERT_LIKE = Family("BERT", "embeddings", "encoder.layer", "attention.self.query", "attention.self.key",
                   "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
DISTILBERT = Family("DistilBERT", "embeddings", "transformer.layer", "attention.q_lin", "attention.k_lin",
                    "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")

# config.model_type -> family; each is tested on a tiny model built from its config (tests/test_model_adapter.py).
FAMILIES = {"bert": BERT_LIKE, "roberta": BERT_LIKE, "xlm-roberta": BERT_LIKE, "electra": BERT_LIKE,
            "distilbert": DISTILBERT}

PROJECTIONS = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")

# What a term can ask of a layer: a tap name -> (the projection hooked, its "input" or its "output").
# All are [batch, length, features]: queries/keys/values/context hold heads x head_size features,
# head h in features [h * head_size, (h + 1) * head_size).
TAPS = {
    "query": ("query", "output"),
    "key": ("key", "output"),
    "value": ("value", "output"),
    "attention_context": ("attention_output", "input"),  # the heads' weighted values, before the output projection
    "attention_output": ("attention_output", "output"),  # before dropout, residual and LayerNorm
    "ffn_in": ("ffn_in", "output"),  # before the activation
    "ffn_activation": ("ffn_out", "input"),  # the FFN's intermediate activations (after the activation)
    "ffn_out": ("ffn_out", "output"),  # before dropout, residual and LayerNorm
}


def unwrapped(model):
    """The model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def family_of(model_type: str | None) -> Family:
    """The family of a config.model_type; one line naming the supported ones where there is none."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no entry in kdqa's model adapter (named access to layers, attention "
            f"and FFN projections); supported: {', '.join(sorted(FAMILIES))}. Pick a model of those families")
    return FAMILIES[model_type]


class Attention(NamedTuple):
    query: torch.nn.Linear
    key: torch.nn.Linear
    value: torch.nn.Linear
    output: torch.nn.Linear


class FFN(NamedTuple):
    input: torch.nn.Linear   # hidden -> intermediate
    output: torch.nn.Linear  # intermediate -> hidden


class ModelAdapter:
    """Named access to one model's parts (a QA model, a base model, or either inside DDP/compile)."""

    def __init__(self, model: torch.nn.Module):
        self.model = unwrapped(model)
        config = getattr(self.model, "config", None)
        self.model_type = getattr(config, "model_type", None)
        self.family = family_of(self.model_type)
        self.config = config
        self.base = getattr(self.model, "base_model", self.model)
        self._check_paths()

    def _check_paths(self) -> None:
        """The family's names must exist in this model (another transformers version may rename them)."""
        paths = [self.family.embeddings, self.family.layers]
        paths += [f"{self.family.layers}.0.{getattr(self.family, part)}" for part in PROJECTIONS]
        for path in paths:
            try:
                self.base.get_submodule(path)
            except AttributeError:
                if path.startswith(f"{self.family.layers}.0.") and not len(self.layers):
                    return  # no encoder layer to look into
                import transformers

                raise UnsupportedModelError(
                    f"the {self.model_type} model ({type(self.model).__name__}) has no module {path!r}, where kdqa's "
                    f"model adapter looks for it (transformers {transformers.__version__} may name it otherwise)"
                ) from None

    @property
    def embeddings(self) -> torch.nn.Module:
        """The embeddings module (ELECTRA with embedding_size != hidden_size projects its output after it)."""
        return self.base.get_submodule(self.family.embeddings)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.base.get_submodule(self.family.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer(self, index: int) -> torch.nn.Module:
        """Encoder layer `index` (from 0); out of range: one line naming the range."""
        if not 0 <= index < self.num_layers:
            raise UnsupportedModelError(
                f"layer {index} is out of range: the {self.model_type} model has encoder layers "
                f"0..{self.num_layers - 1}")
        return self.layers[index]

    def projection(self, index: int, part: str) -> torch.nn.Linear:
        """One of PROJECTIONS of encoder layer `index`."""
        if part not in PROJECTIONS:
            raise UnsupportedModelError(f"no projection {part!r}: the adapter names {', '.join(PROJECTIONS)}")
        return self.layer(index).get_submodule(getattr(self.family, part))

    def attention(self, index: int) -> Attention:
        return Attention(*(self.projection(index, part) for part in ("query", "key", "value", "attention_output")))

    def ffn(self, index: int) -> FFN:
        return FFN(self.projection(index, "ffn_in"), self.projection(index, "ffn_out"))


@dataclass(frozen=True)
class Tap:
    """One thing a loss term needs that transformers does not return: `what` (a TAPS name) of the
    encoder layers `layers` (from 0). Recorded under the keys (what, layer)."""
    what: str
    layers: tuple[int, ...]


def taps(whats: Iterable[str], layers: Iterable[int]) -> tuple[Tap, ...]:
    """Each of `whats` of each of `layers`: taps(("query", "key", "value"), [3, 5])."""
    layers = tuple(sorted(set(layers)))
    return tuple(Tap(what, layers) for what in whats)


class Capture:
    """Forward hooks registered once on one model for the declared taps, recording only inside
    `recording()` (forward_qa's forward): other forward passes (evaluation, the recomputation of
    gradient checkpointing during backward) store nothing. `take()` hands the tensors over and keeps
    none, so nothing outlives the step that used it. With no taps it registers no hook at all."""

    def __init__(self, model: torch.nn.Module, needs: Iterable[Tap] = ()):
        needs = tuple(needs)
        self._seen: dict[tuple[str, int], torch.Tensor] = {}
        self._recording = False
        self._handles = []
        self.keys = tuple(sorted({(tap.what, layer) for tap in needs for layer in tap.layers}))
        if not self.keys:
            return
        adapter = ModelAdapter(model)
        unknown = sorted({what for what, _ in self.keys} - set(TAPS))
        if unknown:
            raise UnsupportedModelError(f"cannot record {', '.join(unknown)}: the adapter records {', '.join(TAPS)}")
        hooked = [(key, TAPS[key[0]][1], adapter.projection(key[1], TAPS[key[0]][0])) for key in self.keys]
        for key, side, module in hooked:  # all looked up first: a bad tap leaves no hook behind
            hook = functools.partial(self._record, key, side)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _record(self, key, side, module, args, kwargs, output) -> None:
        if not self._recording:
            return
        if key in self._seen:
            raise UnsupportedModelError(
                f"{key[0]} of layer {key[1]} was computed twice in one forward (chunked feed-forward, "
                "config.chunk_size_feed_forward > 0?): set chunk_size_feed_forward to 0 to record it")
        self._seen[key] = (args[0] if args else kwargs["input"]) if side == "input" else output

    @contextlib.contextmanager
    def recording(self):
        """Record the taps during one forward; what an earlier forward saw is dropped first."""
        self._seen = {}
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def take(self) -> dict[tuple[str, int], torch.Tensor]:
        """(what, layer) -> tensor from the last recorded forward; the capture keeps no reference."""
        seen, self._seen = self._seen, {}
        return seen

    def remove(self) -> None:
        """Unregister the hooks (the model runs as if never hooked)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen = {}

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
