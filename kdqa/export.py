"""Export a QA model folder to ONNX (and int8), checked against PyTorch before it is kept.

    python train.py export --model_name_or_path runs/student --output_dir runs/student-onnx [--quantize int8]

writes model.onnx (inputs input_ids, attention_mask[, token_type_ids], outputs start_logits and
end_logits, all with dynamic batch and sequence axes), config.json and the tokenizer, so
`QAPredictor.load(output_dir)` / `train.py predict` run it in ONNX Runtime. `--quantize int8`
adds model_int8.onnx: ONNX Runtime's static int8 (kdqa.int8: the schemes worth trying, each scored
against the fp32 model on held-out questions, the best kept only within --max_int8_drop; int8-dynamic:
activations quantised on the fly), applied to the graph after ONNX Runtime's transformer fusions
(`onnxruntime.transformers.optimizer`: LayerNorm + residual, bias + GELU; on MiniLM's 3 layers they
make the int8 model about 15 % faster on the CPU). model.onnx itself stays plain ONNX, for other
runtimes too.

The exporter is torch.export's (`torch.onnx.export(..., dynamo=True)`, needs onnxscript): the
legacy TorchScript tracer gives wrong models for transformers 5's BERT (it bakes the trace's
sequence length into the position embeddings and its attention mask into the graph). Whatever the
exporter, nothing is kept on trust: after export, ONNX Runtime and PyTorch answer the same
padded batch (a shape different from the traced one) and the export is refused when a start or
end logit of a real token differs by more than `tolerance`. Files are written to a staging folder
inside the output folder and moved into place only after the check, so a refused export leaves
nothing that looks like a good model, and the previous export as it was. What an export writes is
recorded (EXPORT_RECORD), so the next export into the folder removes what this one wrote that it does
not write (the recipe's scores and card of another model), never a file kdqa did not write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .atomic_io import write_json_atomic
from .choices import EXPORT_QUANTIZE
from .export_rules import (CALIBRATION_HELP, DEFAULT_CALIBRATION_QUESTIONS, DEFAULT_MAX_INT8_DROP, DEFAULT_OPSET,
                           DEFAULT_TOLERANCE, MIN_OPSET, check_opset)
from .features import Window
from .inference import ONNX_FILE, ONNX_INT8_FILE, OnnxRunner
from .int8 import (INT8_CHECK_QUESTIONS, HeldOut, Int8DropError, Int8Score,
                   calibration_batches, quantize_dynamic, quantize_static, static_schemes)
from .interrupt import SignalsSeen, StopRequest
from .modeling import ModelLoadError, load_qa_model, load_tokenizer, takes_token_type_ids
from .reporting import quiet_progress_bars
from .run_dir import record_outputs, recorded_outputs
from .staging import move_into, new_staging
from .staging import remove_dead_staging as remove_dead_folders

logger = logging.getLogger("kdqa")


class ExportError(ValueError):
    """The exported model is missing a dependency or disagrees with PyTorch: nothing was kept."""


@dataclass(frozen=True)
class Calibration:
    """The questions of int8 ({"id", "question", "context"[, "answers"]} columns) and their window:
    `examples` calibrate static int8, `held_out` (never calibration questions) check every int8 model
    against the fp32 one."""

    examples: dict
    window: Window = Window()
    held_out: dict | None = None


def questions_from_rows(rows, start: int = 0, count: int | None = None) -> dict:
    """SQuAD rows (a Dataset or a list of dicts) start .. start+count as columns; with their answers
    when the rows have them."""
    end = len(rows) if count is None else min(start + count, len(rows))
    picked = [rows[i] for i in range(min(start, end), end)]
    keys = ("id", "question", "context") + (("answers",) if picked and "answers" in picked[0] else ())
    return {key: [row[key] for row in picked] for key in keys}


def calibration_from_rows(rows, questions: int, window: Window = Window(), held_out_rows=None,
                          held_out_questions: int = INT8_CHECK_QUESTIONS) -> Calibration:
    """The first `questions` SQuAD rows calibrate; the int8 check takes `held_out_questions` of
    `held_out_rows` (a dev set) when given, else the rows after the calibration ones."""
    if questions < 1:
        raise ExportError(f"--calibration_questions must be at least 1, got {questions}")
    picked = questions_from_rows(rows, 0, questions)
    if not picked["id"]:
        raise ExportError("the calibration data holds no questions; give a --train_file with SQuAD questions")
    held_out = questions_from_rows(held_out_rows, 0, held_out_questions) if held_out_rows is not None \
        else questions_from_rows(rows, questions, held_out_questions)
    return Calibration(picked, window, held_out)


class _LogitsOnly(torch.nn.Module):
    """The QA model with positional inputs and a (start_logits, end_logits) tuple: ONNX's view."""

    def __init__(self, model, with_token_types: bool):
        super().__init__()
        self.model = model
        self.with_token_types = with_token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_token_types:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs, return_dict=False)
        return out[0], out[1]


def sample_inputs(tokenizer, with_token_types: bool, long: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch of two (question, context) pairs of different lengths: the attention mask has
    zeros, so neither the trace nor the check can skip masking."""
    words = "the river was crossed by a bridge built of stone in the old town".split()
    context = " ".join(words * (4 if long else 1))
    enc = tokenizer(["who built the bridge?", "what is it?"], [context, "a stone bridge"], padding=True,
                    return_tensors="pt")
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    return {name: enc[name] for name in names if name in enc}


def missing_onnx_libraries() -> list[str]:
    """The libraries of the `onnx` extra that are not installed (export needs all three)."""
    return [m for m in ("onnx", "onnxruntime", "onnxscript") if not _importable(m)]


def _require_onnx() -> None:
    missing = missing_onnx_libraries()
    if missing:
        raise ExportError(f"export needs {', '.join(missing)}: pip install 'kdqa[onnx]'")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _export_onnx(model, inputs: dict, path: str, opset: int) -> None:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    names = list(inputs)
    for noisy in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, tuple(inputs.values()), path, dynamo=True, input_names=names,
            output_names=["start_logits", "end_logits"], opset_version=opset, external_data=False,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in names}, verbose=False,
        )


def max_logit_difference(onnx_path: str, model, inputs: dict) -> float:
    """Largest |ONNX Runtime - PyTorch| over the start and end logits of the real (unmasked) tokens."""
    with torch.no_grad():
        expected = model(**inputs)
    got = OnnxRunner(onnx_path, threads=1)(inputs)
    real = inputs["attention_mask"].numpy().astype(bool)
    return max(float(np.max(np.abs(g - e.numpy())[real])) for g, e in zip(got, expected))


def optimize_for_onnxruntime(onnx_path: str, optimized_path: str) -> bool:
    """ONNX Runtime's transformer fusions (SkipLayerNormalization, BiasGelu, ...) into `optimized_path`.

    The fused operators are ONNX Runtime's own (com.microsoft domain), so only the int8 model, which
    is meant for ONNX Runtime anyway, is built from this graph. Returns False (and writes nothing)
    when the optimizer is unavailable or fails: the caller quantises the plain graph instead.
    """
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return False
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the optimizer logs every fusion pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # num_heads/hidden_size 0: read from the graph; "bert" covers BERT-like encoders (DistilBERT too).
            optimized = optimize_model(onnx_path, model_type="bert", num_heads=0, hidden_size=0)
            optimized.save_model_to_file(optimized_path)
    except Exception as error:  # an unknown graph pattern must not cost the user the export
        logger.warning("ONNX Runtime's transformer optimizer failed (%s); int8 is quantised from the plain graph",
                       str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        return False
    finally:
        root.setLevel(level)
    return True


def _int8_source(onnx_path: str, model, check: dict, tolerance: float) -> str:
    """The graph int8 is quantised from: ONNX Runtime's fused one (the fusions match float patterns
    only, so optimise first), or the plain one where the optimizer fails or its graph disagrees."""
    fused_path = os.path.join(os.path.dirname(onnx_path), "fused.onnx")
    if not optimize_for_onnxruntime(onnx_path, fused_path):
        return onnx_path
    if not max_logit_difference(fused_path, model, check) <= tolerance:
        logger.warning("ONNX Runtime's fused graph disagrees with PyTorch; int8 is quantised from the plain graph")
        return onnx_path
    return fused_path


def _held_out(onnx_path: str, tokenizer, calibration: Calibration | None) -> HeldOut | None:
    """The questions every int8 candidate is checked on, with the fp32 model's answers; None (one
    warning) where there are none."""
    examples, kind = (calibration.held_out if calibration else None), "held-out"
    if not (examples and examples["id"]) and calibration and calibration.examples.get("id"):
        logger.warning("int8: no training questions are left after the %d calibration ones, so the int8 model is "
                       "checked on those (not held out); give --validation_file for held-out questions",
                       len(calibration.examples["id"]))
        examples, kind = calibration.examples, "calibration"
    if not (examples and examples["id"]):
        logger.warning("int8: not checked against the fp32 model's answers (no questions): give --train_file or "
                       "--validation_file")
        return None
    return HeldOut(onnx_path, tokenizer, calibration.window, examples, kind)


def _candidates(quantize: str, source: str, calibration: Calibration | None, tokenizer, input_names: list[str],
                checked: bool):
    """Quantise each scheme in turn into the staging folder; yields (scheme name, path). Static int8
    tries every scheme of static_schemes() when the candidates can be checked, else kdqa's default."""
    staging = os.path.dirname(source)
    if quantize != "int8":
        quantize_dynamic(source, os.path.join(staging, "candidate-dynamic.onnx"))
        yield "dynamic, per-channel", os.path.join(staging, "candidate-dynamic.onnx")
        return
    batches = calibration_batches(calibration.examples, tokenizer, input_names, calibration.window)
    schemes = static_schemes() if checked else static_schemes()[:1]
    logger.info("int8: calibrating activation scales on %d training questions (%d windows); %d scheme%s",
                len(calibration.examples["id"]), len(batches), len(schemes), "s" if len(schemes) > 1 else "")
    for i, scheme in enumerate(schemes):
        path = os.path.join(staging, f"candidate-{i}.onnx")
        quantize_static(source, path, batches, scheme, cache=os.path.join(staging, f"ranges-{scheme.calibration}.json"))
        yield scheme.name, path


def _write_int8(quantize: str, onnx_path: str, model, check: dict, tolerance: float, calibration,
                tokenizer) -> tuple[float, Int8Score | None, int]:
    """model_int8.onnx beside onnx_path: the candidate closest to the fp32 model's answers on the
    held-out questions (each candidate's scores logged). Returns its largest logit difference to
    PyTorch, its score (None where unchecked) and the number of candidates."""
    staging = os.path.dirname(onnx_path)
    int8_path = os.path.join(staging, ONNX_INT8_FILE)
    source = _int8_source(onnx_path, model, check, tolerance)
    held = _held_out(onnx_path, tokenizer, calibration)
    best, tried = None, 0
    for name, path in _candidates(quantize, source, calibration, tokenizer, list(check), held is not None):
        tried += 1
        score = held.score(path, name) if held else None
        if score:
            logger.info("int8 candidate %s", score.text())
        if tried == 1 or score.rank > best.rank:
            os.replace(path, int8_path)
            best = score
        else:
            os.remove(path)
    for name in os.listdir(staging):
        if name not in (ONNX_FILE, ONNX_INT8_FILE):
            os.remove(os.path.join(staging, name))  # intermediates: only model.onnx and model_int8.onnx are kept
    int8_diff = max_logit_difference(int8_path, model, check)
    if not np.isfinite(int8_diff):
        raise ExportError("the int8 model gives non-finite logits; nothing was written")
    return int8_diff, best, tried


STAGING_PREFIX = ".export-"  # + host-pid-random: a folder whose export died (kill -9) is found and removed


def remove_dead_staging(output_dir: str) -> None:
    """Delete staging folders that exports killed on this host left behind (their pid is gone);
    a live export's folder, and any folder of another host, is kept."""
    for path in remove_dead_folders(output_dir, STAGING_PREFIX):
        logger.info("removing %s, left by an export that was killed", path)


def _export_and_check(model, tokenizer, onnx_path: str, opset: int, check: dict, signals: SignalsSeen) -> float:
    """Export, then the largest logit difference ONNX Runtime vs PyTorch; one line when the exporter
    fails or writes a graph ONNX Runtime cannot load, or writes another opset than asked for. A
    Ctrl-C/SIGTERM that the exporter turned into its own error stops the export as that signal."""
    try:
        _export_onnx(model, sample_inputs(tokenizer, model.with_token_types), onnx_path, opset)
        signals.raise_if_seen()  # the exporter may catch it and try another strategy
        written = _default_opset(onnx_path)
        if written != opset:
            raise ExportError(f"--opset {opset}: the exporter wrote opset {written} instead; nothing was kept. "
                              f"Give --opset {written}")
        return max_logit_difference(onnx_path, model, check)
    except ExportError:
        raise
    except ModelLoadError as err:
        raise ExportError(f"the model exported with --opset {opset} cannot be run by ONNX Runtime "
                          f"({getattr(err, 'reason', err)}); nothing was kept. Try --opset {MIN_OPSET} "
                          "(the default)") from None
    except Exception as err:  # torch.export / onnxscript raise many types on an unsupported graph or opset
        signals.raise_if_seen()
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ExportError(f"torch's ONNX exporter failed at --opset {opset} ({first[:300]}); nothing was kept. "
                          f"Try --opset {MIN_OPSET} (the default)") from None


def _default_opset(onnx_path: str) -> int | None:
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_model(model_dir: str, output_dir: str, quantize: str = "none", tolerance: float = DEFAULT_TOLERANCE,
                 opset: int = DEFAULT_OPSET, calibration: Calibration | None = None,
                 max_int8_drop: float = DEFAULT_MAX_INT8_DROP) -> dict:
    """Export and check; returns {"files": [...], "max_abs_diff": float, "int8_max_abs_diff": float | None,
    "int8": Int8Score | None}.

    quantize "int8": static int8 calibrated on `calibration` (required); "int8-dynamic": dynamic int8.
    Either is checked on `calibration.held_out` against the fp32 model and refused (Int8DropError,
    nothing written) past `max_int8_drop` (export_rules.MAX_INT8_DROP_HELP)."""
    _require_onnx()
    check_opset(opset)
    if quantize not in EXPORT_QUANTIZE:
        raise ExportError(f"quantize must be one of {EXPORT_QUANTIZE}, got {quantize!r}")
    if quantize == "int8" and calibration is None:
        raise ExportError(CALIBRATION_HELP)
    tokenizer = load_tokenizer(model_dir)
    network = load_qa_model(model_dir, trained_head=True).float().cpu().eval()
    # token_type_ids become an input only when the model uses them and the tokenizer gives them, as
    # in PyTorch prediction (features.py / forward_qa), so both runtimes see the same inputs.
    with_token_types = takes_token_type_ids(network) and "token_type_ids" in tokenizer("a", "b")
    model = _LogitsOnly(network, with_token_types).eval()
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    remove_dead_staging(output_dir)
    staging = new_staging(output_dir, STAGING_PREFIX)
    kept = False
    try:
        with SignalsSeen() as signals, quiet_libraries():
            result = _stage(model, tokenizer, staging, quantize, tolerance, opset, calibration, signals)
            network.config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _refuse_past_bound(result, max_int8_drop, output_dir)
            signals.raise_if_seen()
        _publish(staging, output_dir, result["files"])
        kept = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not kept:
            shutil.rmtree(output_dir, ignore_errors=True)
    _log_export(model_dir, output_dir, result, tolerance)
    return result | {"files": [os.path.join(output_dir, f) for f in result["files"]]}


def _stage(model, tokenizer, staging: str, quantize: str, tolerance: float, opset: int, calibration,
           signals: SignalsSeen) -> dict:
    """model.onnx (and model_int8.onnx) in the staging folder, each checked."""
    onnx_path = os.path.join(staging, ONNX_FILE)
    check = sample_inputs(tokenizer, model.with_token_types, long=True)
    diff = _export_and_check(model, tokenizer, onnx_path, opset, check, signals)
    if not diff <= tolerance:
        raise ExportError(
            f"the exported model disagrees with PyTorch: a start/end logit differs by {diff:.3g} "
            f"(tolerance {tolerance:g}); nothing was written to the output folder. Try another --opset, or "
            "raise --tolerance if the difference is acceptable for this model"
        )
    result = {"files": [ONNX_FILE], "max_abs_diff": diff, "int8_max_abs_diff": None, "int8": None, "int8_tried": 0}
    if quantize != "none":
        result["int8_max_abs_diff"], result["int8"], result["int8_tried"] = _write_int8(
            quantize, onnx_path, model, check, tolerance, calibration, tokenizer)
        result["files"].append(ONNX_INT8_FILE)
    return result


def _refuse_past_bound(result: dict, max_int8_drop: float, output_dir: str) -> None:
    score = result["int8"]
    reason = score.past(max_int8_drop) if score else None
    if reason:
        raise Int8DropError(
            f"int8 refused ({reason}): {score.text()}, the best of {result['int8_tried']} int8 scheme"
            f"{'s' if result['int8_tried'] > 1 else ''}; nothing was written to {output_dir} (an earlier export "
            "there is as it was). Serve model.onnx (export without --quantize), or raise --max_int8_drop if "
            "this loss is acceptable")


def _log_export(model_dir: str, output_dir: str, result: dict, tolerance: float) -> None:
    score = result["int8"]
    int8 = ""
    if result["int8_max_abs_diff"] is not None:
        int8 = f"; int8: max |logit difference| {result['int8_max_abs_diff']:.2g}, " + (
            f"kept {score.text()}" if score else "not checked against the fp32 model's answers")
    logger.info("exported %s -> %s (%s); ONNX Runtime vs PyTorch: max |logit difference| %.2g (tolerance %g)%s",
                model_dir, output_dir, ", ".join(result["files"]), result["max_abs_diff"], tolerance, int8)


# ----------------------------------------------------------------------------- the output folder

EXPORT_RECORD = ".kdqa-export.json"  # the names the last export (and the recipe's scoring of it) wrote here


def record_export_outputs(output_dir: str, *names: str) -> None:
    """Add names to output_dir's record of its export's outputs, before they are written (the recipe's
    scores, report and model card of the served model): the next export removes them."""
    record_outputs(output_dir, *names, record=EXPORT_RECORD)


def _publish(staging: str, output_dir: str, files: list[str]) -> None:
    """Move the staged export into output_dir, the models last (a folder with model.onnx is one whose
    export passed the check), after removing what the previous export wrote that this one does not
    (and model_int8.onnx, which exports of older kdqa did not record): never a file kdqa did not write
    there, nor one a training run in the same folder recorded. Ctrl-C/SIGTERM wait for the moves."""
    names = [n for n in os.listdir(staging) if n not in files] + files
    previous = (recorded_outputs(output_dir, EXPORT_RECORD) or set()) | {ONNX_INT8_FILE}
    stale = sorted(previous - set(names) - (recorded_outputs(output_dir) or set()))
    record_export_outputs(output_dir, *names)
    with StopRequest() as stop:
        for name in stale:
            path = os.path.join(output_dir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)  # another model's card, scores or int8 model would be served beside this one
        move_into(staging, output_dir, names, sync=False)
        write_json_atomic(os.path.join(output_dir, EXPORT_RECORD), {"names": sorted(names)}, indent=1,
                          ensure_ascii=True, end="")
    if stop.signum is not None:
        signal.raise_signal(stop.signum)  # the export is complete; now the signal stops the command


@contextlib.contextmanager
def quiet_libraries():
    """While exporting, other libraries' INFO records (the ONNX exporter's and optimisers' passes: 22 to
    49 lines a recipe) show at DEBUG only, ONNX Runtime's own log at errors only; warnings and errors stay."""
    handlers, quiet = list(logging.getLogger().handlers), _OtherLibrariesAtDebug()
    for handler in handlers:
        handler.addFilter(quiet)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
        onnxruntime.set_default_logger_severity(2)


class _OtherLibrariesAtDebug(logging.Filter):
    """Shows other libraries' INFO records (the ONNX exporter's and optimisers' passes: about a hundred
    lines under the [kdqa] prefix) at DEBUG, i.e. only where logging is set to DEBUG; their warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "kdqa" or record.levelno >= logging.WARNING:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def export_command(args) -> dict:
    """`train.py export`: kdqa's lines only (the libraries' progress at debug level); the files written."""
    quiet_progress_bars(args.disable_tqdm)  # the bars of loading the model and tokenising the calibration set
    _warn_unused_flags(args)
    calibration = None
    if args.quantize != "none" and (args.train_file or args.validation_file):
        from .data import load_squad

        window = Window.from_args(args)
        dev = load_squad(validation_file=args.validation_file, splits=("validation",))["validation"] \
            if args.validation_file else None
        rows = load_squad(train_file=args.train_file, splits=("train",))["train"] if args.train_file else None
        if args.quantize == "int8":
            calibration = calibration_from_rows(rows, args.calibration_questions, window, held_out_rows=dev)
        else:  # dynamic int8 calibrates nothing: the first questions are held out from nothing
            calibration = Calibration({}, window, questions_from_rows(dev if dev is not None else rows, 0,
                                                                      INT8_CHECK_QUESTIONS))
    result = export_model(args.model_name_or_path, args.output_dir, quantize=args.quantize, tolerance=args.tolerance,
                          opset=args.opset, calibration=calibration, max_int8_drop=args.max_int8_drop)
    for path in result["files"]:
        print(path)
    return result


def _warn_unused_flags(args) -> None:
    """One line for the int8 flags that this --quantize ignores (they were silently dropped)."""
    unused = [flag for flag, given in (
        ("--train_file", args.train_file and args.quantize == "none"),
        ("--validation_file", args.validation_file and args.quantize == "none"),
        ("--calibration_questions", args.calibration_questions != DEFAULT_CALIBRATION_QUESTIONS
         and args.quantize != "int8"),
        ("--max_int8_drop", args.max_int8_drop != DEFAULT_MAX_INT8_DROP and args.quantize == "none")) if given]
    if unused:
        logger.warning("export: %s %s ignored without --quantize int8%s", " and ".join(unused),
                       "is" if len(unused) == 1 else "are",
                       " (int8-dynamic calibrates nothing)" if args.quantize == "int8-dynamic" else "")
