"""Export's rules that the command line needs before anything is loaded: the opset bounds, the int8
calibration and drop defaults, and the one-line messages that explain them. kdqa.export applies
them when it runs; the flag groups and the parse-time checks read them from here, which imports
no torch or onnx (at import), so `train.py --help` stays fast."""

from __future__ import annotations

from kdqa.config_error import ConfigError

MIN_OPSET = 18  # torch.onnx.export(dynamo=True) writes opset 18 at least; below it fails or quietly writes 18
DEFAULT_OPSET = MIN_OPSET  # the messages below say "give --opset 18 (the default)"
DEFAULT_TOLERANCE = 1e-3  # fp32 through another runtime: differences are ~1e-6 on real models

DEFAULT_CALIBRATION_QUESTIONS = 100  # static int8's calibration set (see benchmarks/RESULTS.md, int8)
CALIBRATION_HELP = ("export --quantize int8 calibrates its activation scales on training questions: give "
                    "--train_file FILE (SQuAD v1.1 JSON), or --quantize int8-dynamic (no calibration, but a "
                    "question's answer then depends on the other questions of its batch)")


DEFAULT_MAX_INT8_DROP = 5.0  # F1 points; why: MAX_INT8_DROP_HELP (the check itself: kdqa.int8)
MAX_INT8_DROP_HELP = (
    "F1 points: refuse the int8 model (nothing is written) when, on the held-out questions, its F1 is more "
    "than this below the fp32 model's (with 95 %% confidence; 30 or more questions with gold answers), or "
    "when it gives the fp32 model's answer to fewer than a fifth of them (95 %% confidence; with or without "
    "gold answers: a collapsed model). Why 5: a sound static int8 model loses 0-2.5 F1 (issue 34's peer check on "
    "2,000 SQuAD questions; -1.1 to -0.2 in the first command here), a loss surely over 5 is twice that, and a collapsed model loses nearly all its F1")


def check_opset(opset: int) -> None:
    """export --opset within what the exporter writes and the installed onnx knows."""
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later; "
                          f"give --opset {MIN_OPSET} (the default) or higher")
    try:
        import onnx
    except ImportError:
        return  # export itself says to install kdqa[onnx]
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ConfigError(f"--opset {opset}: the installed onnx knows opsets up to {newest}; give --opset "
                          f"{MIN_OPSET} to {newest} (default {MIN_OPSET})")
