"""Export a QA model folder to ONNX (and int8), checked against PyTorch before it is kept.

    python train.py export --model_name_or_path runs/student --output_dir runs/student-onnx [--quantize int8]

writes model.onnx (inputs input_ids, attention_mask[, token_type_ids], outputs start_logits and
end_logits, all with dynamic batch and sequence axes), config.json and the tokenizer, so
`QAPredictor.load(output_dir)` / `train.py predict` run it in ONNX Runtime. `--quantize int8`
adds model_int8.onnx: ONNX Runtime's dynamic quantisation (int8 weights, activations quantised
on the fly), the usual choice for transformer encoders on CPUs, applied to the graph after ONNX
Runtime's transformer fusions (`onnxruntime.transformers.optimizer`: LayerNorm + residual, bias +
GELU; on MiniLM's 3 layers they make the int8 model about 15 % faster on the CPU). model.onnx itself
stays plain ONNX, for other runtimes too.

The exporter is torch.export's (`torch.onnx.export(..., dynamo=True)`, needs onnxscript): the
legacy TorchScript tracer gives wrong models for transformers 5's BERT (it bakes the trace's
sequence length into the position embeddings and its attention mask into the graph). Whatever the
exporter, nothing is kept on trust: after export, ONNX Runtime and PyTorch answer the same
padded batch (a shape different from the traced one) and the export is refused when a start or
end logit of a real token differs by more than `tolerance`. Files are written to a staging folder
inside the output folder and moved into place only after the check, so a refused export leaves
nothing that looks like a good model.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .config import CALIBRATION_HELP, MIN_OPSET, check_opset
from .features import QACollator, Window, prepare_eval_features
from .inference import ONNX_FILE, ONNX_INT8_FILE, OnnxRunner
from .modeling import ModelLoadError, load_qa_model, load_tokenizer, takes_token_type_ids
from .reporting import quiet_progress_bars

logger = logging.getLogger("kdqa")

DEFAULT_TOLERANCE = 1e-3  # fp32 through another runtime: differences are ~1e-6 on real models


class ExportError(ValueError):
    """The exported model is missing a dependency or disagrees with PyTorch: nothing was kept."""


@dataclass(frozen=True)
class Calibration:
    """The questions static int8 calibrates on ({"id", "question", "context"} columns) and their window."""

    examples: dict
    window: Window = Window()


def calibration_from_rows(rows, questions: int, window: Window = Window()) -> Calibration:
    """The first `questions` SQuAD rows (a Dataset or a list of dicts) as a Calibration."""
    if questions < 1:
        raise ExportError(f"--calibration_questions must be at least 1, got {questions}")
    picked = [rows[i] for i in range(min(questions, len(rows)))]
    if not picked:
        raise ExportError("the calibration data holds no questions; give a --train_file with SQuAD questions")
    return Calibration({key: [row[key] for row in picked] for key in ("id", "question", "context")}, window)


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


QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic")


def _quiet_quantizer(run) -> None:
    """ONNX Runtime's quantiser logs one INFO line per tensor left in float, and advice to pre-process."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
    finally:
        root.setLevel(level)


def quantize_onnx_int8_dynamic(onnx_path: str, int8_path: str) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights (MatMul/Gemm), activations quantised at run time
    with one scale over the whole batch, padding included: an answer depends on its batch neighbours.

    Per-channel weight scales: on MiniLM's layers they cut the logits' error against fp32 by 2-3x
    over one scale per matrix, at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_quantizer(lambda: quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QInt8, per_channel=True))


def calibration_batches(examples, tokenizer, input_names: list[str], window: Window) -> list[dict]:
    """The windows of the calibration questions, one unpadded feature per batch (numpy), so the
    activation ranges are those of real tokens, never of padding."""
    features = prepare_eval_features(examples, tokenizer, window, as_dataset=False)
    collate = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=None)
    rows = [{name: features[name][i] for name in input_names} for i in range(len(features["input_ids"]))]
    return [{name: value.numpy() for name, value in collate([row]).items() if name in input_names} for row in rows]


def quantize_onnx_int8_static(onnx_path: str, int8_path: str, batches: list[dict]) -> None:
    """ONNX Runtime static quantisation in QDQ form: int8 weights with per-channel scales, and uint8
    activations of the MatMul/Gemm inputs with scales fixed by a MinMax calibration over `batches`.
    Fixed scales: a question's logits do not depend on the other questions of its batch; and ONNX
    Runtime runs the quantised MatMuls without computing scales at run time."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(batches)

        def get_next(self):
            return next(self.left, None)

    _quiet_quantizer(lambda: quantize_static(
        onnx_path, int8_path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax))


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


def _write_int8(quantize: str, onnx_path: str, model, check: dict, tolerance: float, calibration, tokenizer) -> float:
    """model_int8.onnx beside onnx_path, quantised from ONNX Runtime's fused graph (optimise, then
    quantise: the fusions match float patterns only); returns its largest logit difference to PyTorch."""
    staging = os.path.dirname(onnx_path)
    fused_path = os.path.join(staging, "fused.onnx")
    int8_path = os.path.join(staging, ONNX_INT8_FILE)
    fused = optimize_for_onnxruntime(onnx_path, fused_path)
    if fused and not max_logit_difference(fused_path, model, check) <= tolerance:
        logger.warning("ONNX Runtime's fused graph disagrees with PyTorch; int8 is quantised from the plain graph")
        fused = False
    source = fused_path if fused else onnx_path
    if quantize == "int8":
        batches = calibration_batches(calibration.examples, tokenizer, list(check), calibration.window)
        logger.info("int8: calibrating activation scales on %d training questions (%d windows)",
                    len(calibration.examples["id"]), len(batches))
        quantize_onnx_int8_static(source, int8_path, batches)
    else:
        quantize_onnx_int8_dynamic(source, int8_path)
    if os.path.exists(fused_path):
        os.remove(fused_path)  # an intermediate: only model.onnx and model_int8.onnx are kept
    int8_diff = max_logit_difference(int8_path, model, check)
    if not np.isfinite(int8_diff):
        raise ExportError("the int8 model gives non-finite logits; nothing was written")
    return int8_diff


STAGING_PREFIX = ".export-"  # + host-pid-random: a folder whose export died (kill -9) is found and removed


def remove_dead_staging(output_dir: str) -> None:
    """Delete staging folders that exports killed on this host left behind (their pid is gone);
    a live export's folder, and any folder of another host, is kept."""
    from .teacher_cache import _pid_alive

    pattern = re.compile(re.escape(f"{STAGING_PREFIX}{socket.gethostname()}-") + r"(\d+)-")
    for name in os.listdir(output_dir):
        match = pattern.match(name)
        if match and not _pid_alive(int(match.group(1))):
            logger.info("removing %s, left by an export that was killed", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _export_and_check(model, tokenizer, onnx_path: str, opset: int, check: dict) -> float:
    """Export, then the largest logit difference ONNX Runtime vs PyTorch; one line when the exporter
    fails or writes a graph ONNX Runtime cannot load, or writes another opset than asked for."""
    try:
        _export_onnx(model, sample_inputs(tokenizer, model.with_token_types), onnx_path, opset)
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
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ExportError(f"torch's ONNX exporter failed at --opset {opset} ({first[:300]}); nothing was kept. "
                          f"Try --opset {MIN_OPSET} (the default)") from None


def _default_opset(onnx_path: str) -> int | None:
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_model(model_dir: str, output_dir: str, quantize: str = "none", tolerance: float = DEFAULT_TOLERANCE,
                 opset: int = 18, calibration: Calibration | None = None) -> dict:
    """Export and check; returns {"files": [...], "max_abs_diff": float, "int8_max_abs_diff": float | None}.

    quantize "int8": static int8 calibrated on `calibration` (required); "int8-dynamic": dynamic int8."""
    _require_onnx()
    check_opset(opset)
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
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
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=output_dir)
    kept = False
    try:
        onnx_path = os.path.join(staging, ONNX_FILE)
        check = sample_inputs(tokenizer, model.with_token_types, long=True)
        diff = _export_and_check(model, tokenizer, onnx_path, opset, check)
        if not diff <= tolerance:
            raise ExportError(
                f"the exported model disagrees with PyTorch: a start/end logit differs by {diff:.3g} "
                f"(tolerance {tolerance:g}); nothing was written to {output_dir}. Try another --opset, or "
                "raise --tolerance if the difference is acceptable for this model"
            )
        files = [ONNX_FILE]
        int8_diff = None
        if quantize != "none":
            int8_diff = _write_int8(quantize, onnx_path, model, check, tolerance, calibration, tokenizer)
            files.append(ONNX_INT8_FILE)
        network.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # The models last: a folder with model.onnx is one whose export passed the check.
        names = [n for n in os.listdir(staging) if n not in files] + files
        stale = os.path.join(output_dir, ONNX_INT8_FILE)
        if ONNX_INT8_FILE not in files and os.path.exists(stale):
            os.remove(stale)  # an int8 model of an earlier export would be served beside this model.onnx
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        kept = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not kept:
            shutil.rmtree(output_dir, ignore_errors=True)
    logger.info("exported %s -> %s (%s); ONNX Runtime vs PyTorch: max |logit difference| %.2g (tolerance %g)%s",
                model_dir, output_dir, ", ".join(files), diff, tolerance,
                f"; int8: {int8_diff:.2g} (quantisation, not checked)" if int8_diff is not None else "")
    return {"files": [os.path.join(output_dir, f) for f in files], "max_abs_diff": diff,
            "int8_max_abs_diff": int8_diff}


class _OtherLibrariesAtDebug(logging.Filter):
    """Shows other libraries' INFO records (the ONNX exporter's and optimisers' passes: about a hundred
    lines under the [kdqa] prefix) at DEBUG, i.e. only where logging is set to DEBUG; their warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "kdqa" or record.levelno >= logging.WARNING:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def export_command(args) -> dict:
    """`train.py export`: one log line of ours, the libraries' progress at debug level."""
    quiet_progress_bars(args.disable_tqdm)  # the bars of loading the model and tokenising the calibration set
    calibration = None
    if args.quantize == "int8":
        if not args.train_file:
            raise ExportError(CALIBRATION_HELP)
        from .data import load_squad

        rows = load_squad(train_file=args.train_file, splits=("train",))["train"]
        calibration = calibration_from_rows(rows, args.calibration_questions, 
                                            Window.from_args(args))
    handlers, quiet = list(logging.getLogger().handlers), _OtherLibrariesAtDebug()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        result = export_model(args.model_name_or_path, args.output_dir, quantize=args.quantize,
                              tolerance=args.tolerance, opset=args.opset, calibration=calibration)
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    for path in result["files"]:
        print(path)
    return result
