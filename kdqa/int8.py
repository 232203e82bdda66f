"""ONNX Runtime int8 for an exported QA model: the static schemes worth trying, their calibration,
and the check that decides whether an int8 model may be kept at all.

Quantisation can go wrong silently: a model whose logits stay finite can still give answers that
have nothing to do with the fp32 model's. So no int8 model is kept on trust. Each candidate answers
held-out questions (never calibration questions), and is scored against the fp32 ONNX model on
the same questions: agreement (how often its answer is fp32's, after SQuAD's normalisation) and,
where the questions have gold answers, the official F1 of both. The best candidate is kept only
within `--max_int8_drop` (export_rules.MAX_INT8_DROP_HELP says why its default is 5).

The static schemes (`static_schemes`): the calibration method (MinMax, or Percentile 99.99, which
clips the rare outliers that stretch a MinMax range), per-channel weight scales on and off, and on
x86 CPUs without VNNI also `reduce_range` (7-bit weights: the AVX2 u8s8 kernels sum pairs of
products in int16 and can saturate). Their calibration is run once per method: ONNX Runtime's
calibration cache carries the ranges to the other schemes of that method.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import platform
import statistics
import warnings
from dataclasses import dataclass

from .features import QACollator, Window, prepare_eval_features
from .inference import OnnxRunner, QAPredictor
from .metric import f1_score, metric_max_over_ground_truths
from .postprocess import answer_texts
from .report_card import answer_agreement

logger = logging.getLogger("kdqa")

INT8_CHECK_QUESTIONS = 200  # held-out questions each int8 candidate answers (about 1 s each for MiniLM-L3)


class Int8DropError(ValueError):
    """The best int8 candidate lost more against the fp32 model than --max_int8_drop allows."""


# ----------------------------------------------------------------------------- the schemes

@dataclass(frozen=True)
class Scheme:
    """One static int8 configuration of ONNX Runtime's quantize_static (QDQ, uint8 activations, int8 weights)."""

    calibration: str = "MinMax"  # or "Percentile" (99.99th percentile of |activation|)
    per_channel: bool = True
    reduce_range: bool = False

    @property
    def name(self) -> str:
        method = "Percentile 99.99" if self.calibration == "Percentile" else self.calibration
        return ", ".join([method, "per-channel" if self.per_channel else "per-tensor"]
                         + (["reduce_range"] if self.reduce_range else []))


PERCENTILE = 99.99
# Percentile's histograms cost about 3x MinMax per window; 48 windows of 256 tokens still give each tensor
# millions of values, hundreds of them beyond its 99.99th percentile.
PERCENTILE_WINDOWS = 48


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI or AVX-VNNI) per /proc/cpuinfo; None where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return None
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}) if flags else None


def static_schemes() -> list[Scheme]:
    """The schemes tried, MinMax per-channel (kdqa's earlier only scheme) first: both calibration
    methods with per-channel scales on and off, and reduce_range only where it can help (an x86 CPU
    without VNNI, or one we cannot tell)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    ranges = (False, True) if x86 and not cpu_has_vnni() else (False,)
    return [Scheme(method, per_channel, reduce) for method in ("MinMax", "Percentile")
            for reduce in ranges for per_channel in (True, False)]


def calibration_batches(examples, tokenizer, input_names: list[str], window: Window) -> list[dict]:
    """The windows of the calibration questions, one unpadded feature per batch (numpy), so the
    activation ranges are those of real tokens, never of padding. Windows differ in length:
    the calibrators see one at a time (ONNX Runtime's strided calibration, stride 1), as its
    histogram calibrators would otherwise stack them into one array."""
    features = prepare_eval_features(examples, tokenizer, window, as_dataset=False)
    collate = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=None)
    rows = [{name: features[name][i] for name in input_names} for i in range(len(features["input_ids"]))]
    return [{name: value.numpy() for name, value in collate([row]).items() if name in input_names} for row in rows]


@contextlib.contextmanager
def quiet_quantizer():
    """ONNX Runtime's quantiser logs one INFO line per tensor left in float, advice to pre-process,
    and its histogram calibrators print() a line per batch: none of it is kdqa's."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _reader(batches: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The batches, in ranges (ONNX Runtime's CalibStridedMinMax reads them one range at a time)."""

        def __init__(self):
            self.left = iter(batches)

        def get_next(self):
            return next(self.left, None)

        def __len__(self):
            return len(batches)

        def set_range(self, start_index: int, end_index: int):
            self.left = iter(batches[start_index:end_index])

    return Reader()


def quantize_static(source: str, int8_path: str, batches: list[dict], scheme: Scheme = Scheme(),
                    cache: str | None = None) -> None:
    """ONNX Runtime static quantisation in QDQ form: int8 weights, uint8 activations of the MatMul/Gemm
    inputs with scales fixed by calibration over `batches`. Fixed scales: a question's logits do not
    depend on the other questions of its batch, and no scale is computed at run time. `cache`: a
    file for this scheme's calibration method, reused by the next scheme of the same method."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static as ort_static

    options = {"CalibStridedMinMax": 1}  # one window at a time: any lengths, bounded memory
    if scheme.calibration == "Percentile":
        options.update(CalibPercentile=PERCENTILE)
        batches = batches[:PERCENTILE_WINDOWS]
    extra = {}
    if cache and "calibration_cache_path" in inspect.signature(ort_static).parameters:  # onnxruntime >= 1.24
        extra["calibration_cache_path"] = cache
    with quiet_quantizer():
        ort_static(source, int8_path, _reader(batches), quant_format=QuantFormat.QDQ,
                   op_types_to_quantize=["MatMul", "Gemm"], per_channel=scheme.per_channel,
                   reduce_range=scheme.reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                   calibrate_method=getattr(CalibrationMethod, scheme.calibration), extra_options=options, **extra)


def quantize_dynamic(source: str, int8_path: str) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights (MatMul/Gemm), activations quantised at run time
    with one scale over the whole batch, padding included: an answer depends on its batch neighbours.

    Per-channel weight scales: on MiniLM's layers they cut the logits' error against fp32 by 2-3x
    over one scale per matrix, at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_dynamic

    with quiet_quantizer():
        ort_dynamic(source, int8_path, weight_type=QuantType.QInt8, per_channel=True)


# ----------------------------------------------------------------------------- the check against fp32

Z_ONE_SIDED_95 = 1.645
MIN_QUESTIONS_FOR_F1_RULE = 30  # below, the drop's normal approximation is not trusted: only the agreement rule


MIN_AGREEMENT = 0.2  # a collapsed model gives fp32's answer to almost no question (0 of 30 in issue 34)


def surely_below(same: int, n: int, share: float = MIN_AGREEMENT) -> bool:
    """Whether `same` answers of n equal to fp32's show, at 95 % confidence, a model that gives fp32's
    answer to fewer than `share` of the questions: a model at `share` would show this few with chance
    below 5 % (exact binomial). A sound int8 model of a weak fp32 model agrees far more often, though
    far from always (41.0-85.0 % for every scheme tried on the first command's three 18-F1 students,
    200 questions, benchmarks/RESULTS.md: flat logits let int8 noise move many answers)."""
    return n > 0 and sum(math.comb(n, k) * share ** k * (1 - share) ** (n - k) for k in range(same + 1)) < 0.05


@dataclass(frozen=True)
class Int8Score:
    """An int8 candidate against the fp32 model on the same held-out questions."""

    name: str
    questions: int
    agreement: float              # % of questions whose int8 answer is fp32's (normalised)
    answer_f1: float              # mean token F1 of the int8 answer against fp32's
    f1: float | None = None       # official F1 against gold answers, where the questions have them
    fp32_f1: float | None = None
    drop_se: float | None = None  # standard error of the F1 drop (paired, per question)
    kind: str = "held-out"        # or "calibration" where no question was left to hold out

    @property
    def rank(self) -> tuple:
        """Better first when sorted in reverse: closeness to fp32's answers (answer F1), then gold F1.
        Closeness, not gold F1 first: on 200 questions candidates' gold F1 differ mostly by noise (int8
        "beat" fp32 by 1.1 F1 on the recipe's student), while closeness separates them (79-88 %
        agreement against 63-75 % for MinMax there)."""
        return self.answer_f1, self.agreement, self.f1 if self.f1 is not None else 0.0

    def text(self) -> str:
        gold = f", F1 {self.f1:.2f} against fp32's {self.fp32_f1:.2f}" if self.f1 is not None else ""
        return (f"{self.name}: agreement {self.agreement:.1f} % with fp32's answers (answer F1 "
                f"{self.answer_f1:.1f}){gold} on {self.questions} {self.kind} questions")

    def past(self, max_drop: float) -> str | None:
        """Why this score is past the bound (export_rules.MAX_INT8_DROP_HELP: each rule at 95 % confidence), or None."""
        if surely_below(round(self.agreement * self.questions / 100), self.questions):
            return f"it gives fp32's answer to fewer than {MIN_AGREEMENT:.0%} of the questions"
        if self.f1 is not None and self.questions >= MIN_QUESTIONS_FOR_F1_RULE:
            drop, margin = self.fp32_f1 - self.f1, Z_ONE_SIDED_95 * self.drop_se
            if drop - margin > max_drop:
                return f"F1 drop {drop:.2f} (+-{margin:.2f}) > --max_int8_drop {max_drop:g}"
        return None


def _question_f1(answers: dict[str, str], examples: dict) -> list[float]:
    """Each question's official F1 (percent) against its gold answers."""
    return [100.0 * metric_max_over_ground_truths(f1_score, answers.get(str(qid), ""), gold["text"])
            for qid, gold in zip(examples["id"], examples["answers"])]


class HeldOut:
    """Held-out questions, their windows and the fp32 model's answers, ready to score candidates."""

    def __init__(self, fp32_path: str, tokenizer, window: Window, examples: dict, kind: str = "held-out"):
        self.tokenizer, self.window, self.examples, self.kind = tokenizer, window, examples, kind
        self.features = prepare_eval_features(examples, tokenizer, window, as_dataset=False)
        self.gold = bool(examples.get("answers")) and all(len(a["text"]) for a in examples["answers"])
        self.fp32 = self.answers(fp32_path)
        self.fp32_f1 = _question_f1(self.fp32, examples) if self.gold else None

    def answers(self, onnx_path: str) -> dict[str, str]:
        predictor = QAPredictor(OnnxRunner(onnx_path), self.tokenizer, self.window)
        return answer_texts(predictor.predict(self.examples, features=self.features)[0])

    def score(self, onnx_path: str, name: str) -> Int8Score:
        answers = self.answers(onnx_path)
        agreement = answer_agreement(answers, self.fp32)
        gold = {}
        if self.gold:
            f1 = _question_f1(answers, self.examples)
            drops = [a - b for a, b in zip(self.fp32_f1, f1)]
            gold = dict(f1=statistics.fmean(f1), fp32_f1=statistics.fmean(self.fp32_f1),
                        drop_se=statistics.stdev(drops) / math.sqrt(len(drops)) if len(drops) > 1 else 0.0)
        return Int8Score(name, agreement["questions"], agreement["same_answer"], agreement["answer_f1"], **gold,
                         kind=self.kind)
