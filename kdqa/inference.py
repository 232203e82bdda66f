"""The one inference path: a model -> answers to (question, context) pairs, with text, score and
character offsets.

Everything that answers questions goes through here, so every number kdqa reports comes from the
same code: the training loop's evaluation and `train.py evaluate` (`predict_and_score`: prediction
plus the official metric), `train.py predict` (`predict_command`), and benchmarks/bench_inference.py.

    predictor = QAPredictor.load("runs/student")                 # PyTorch fp32
    predictor = QAPredictor.load("runs/student", quantize="int8")  # PyTorch dynamic int8 Linear layers
    predictor = QAPredictor.load("runs/student-onnx")            # ONNX Runtime (the folder has model.onnx)
    predictor.answer("Who wrote it?", "It was written by Ada.")  # -> Answer(text="Ada", score=..., start=18, end=21)

The steps: windows as in training (`features.prepare_eval_features`: question + overlapping context
windows of max_seq_length tokens), the model over length-sorted batches (little padding), span
decoding over all windows of a question (`postprocess.decode_spans`). Gold answers are never
needed; when the examples have them, `predict_and_score` adds EM/F1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings

import numpy as np
import torch

from .features import DOC_STRIDE, MAX_QUERY_LENGTH, MAX_SEQ_LENGTH, QACollator, Window, prepare_eval_features
from .metric import squad_v1_score
from .modeling import ModelLoadError, load_qa_model, load_tokenizer
from .modeling import logits_over_features as run_over_features
from .postprocess import Decoding, decode_spans
from .reporting import quiet_progress_bars

logger = logging.getLogger("kdqa")

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_int8.onnx"
RUNTIMES = ("auto", "torch", "onnxruntime")
QUANTIZE = ("none", "int8")


@dataclasses.dataclass(frozen=True)
class Answer:
    """One question's answer: context[start:end] == text; score = start logit + end logit of the
    span. No valid span in any window: text "", score/start/end None."""

    id: str
    text: str
    score: float | None
    start: int | None
    end: int | None


# ----------------------------------------------------------------------------- the models


class TorchQAModel:
    """A PyTorch QA model with the device and autocast dtype it answers with."""

    def __init__(self, model: torch.nn.Module, device="cpu", autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype


class OnnxQAModel:
    """An exported model (kdqa.export) in ONNX Runtime, as a function: collated batch -> (start, end) logits.

    Tuned for answering questions one at a time on a CPU: full graph optimisation, `threads`
    intra-op threads (default: ONNX Runtime's, one per physical core), sequential execution.
    """

    def __init__(self, path: str, threads: int | None = None):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: no warnings about unused initialisers
        self.path = path
        self.session = _onnx_session(ort, path, options)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if not set(self.input_names) <= set(MODEL_COLUMNS) or len(self.session.get_outputs()) != 2:
            raise ModelLoadError(f"{path} is not a kdqa QA export (inputs {self.input_names}, "
                                 f"{len(self.session.get_outputs())} outputs); {REEXPORT_HINT}")
        self.device = torch.device("cpu")

    def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        feed = {name: batch[name].numpy() for name in self.input_names}
        start, end = self.session.run(None, feed)
        return start, end


REEXPORT_HINT = "re-export it: python train.py export --model_name_or_path MODEL_DIR --output_dir EXPORT_DIR"


def _onnx_session(ort, path: str, options):
    """ONNX Runtime's session, or one line naming the file when it is empty, truncated or not a valid
    graph (ONNX Runtime raises its own exception types, InvalidProtobuf, InvalidGraph, Fail, ...)."""
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"{path} is empty (an interrupted copy or export?); {REEXPORT_HINT}")
    try:
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:300]
        error = ModelLoadError(f"{path} is not a valid ONNX model that ONNX Runtime can load ({reason}); "
                               f"{REEXPORT_HINT}")
        error.reason = reason  # export names the cause in its own words
        raise error from None


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("ONNX Runtime is not installed; pip install 'kdqa[onnx]' (onnx, onnxruntime)") from None
    return onnxruntime


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch dynamic int8: every nn.Linear gets int8 weights, activations quantised on the fly.

    torch.ao.quantization.quantize_dynamic still works in torch 2.13 but is deprecated in favour of
    torchao (`torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())`), which
    is not a kdqa dependency; the deprecation warnings are silenced here, once, on purpose.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model.float().cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)


# ----------------------------------------------------------------------------- logits and decoding


def _numpy(logits) -> np.ndarray:
    return logits.float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, dtype=np.float32)


def logits_over_features(model, features, collate_fn, batch_size: int, progress: bool = False,
                         desc: str = "predicting") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits per feature, unpadded float32 arrays in feature order.

    model: a TorchQAModel or an OnnxQAModel; the length-sorted batching is modeling.logits_over_features'.
    """
    starts: dict[int, np.ndarray] = {}
    ends: dict[int, np.ndarray] = {}

    def keep(indices, lengths, start_logits, end_logits):
        start_logits, end_logits = _numpy(start_logits), _numpy(end_logits)
        for j, (i, n) in enumerate(zip(indices.tolist(), lengths.tolist())):
            starts[i], ends[i] = start_logits[j, :n].copy(), end_logits[j, :n].copy()

    if isinstance(model, TorchQAModel):
        run_over_features(model.model, features, collate_fn, keep, batch_size=batch_size, device=model.device,
                          autocast_dtype=model.autocast_dtype, progress=progress, desc=desc)
    else:
        run_over_features(model, features, collate_fn, keep, batch_size=batch_size, device=model.device,
                          progress=progress, desc=desc, forward=lambda onnx_model, batch: onnx_model(batch))
    return [starts[i] for i in range(len(starts))], [ends[i] for i in range(len(ends))]


def predict_logits(model, features, collate_fn, batch_size: int, device, autocast_dtype: torch.dtype | None = None,
                   progress: bool = False, desc: str = "evaluating") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """logits_over_features for a PyTorch model (eval mode during, its previous mode restored)."""
    return logits_over_features(TorchQAModel(model, device, autocast_dtype), features, collate_fn, batch_size,
                                progress=progress, desc=desc)


def _as_model(model, device, autocast_dtype):
    return TorchQAModel(model, device, autocast_dtype) if isinstance(model, torch.nn.Module) else model


def decode_answers(examples, features, all_start, all_end, decoding: Decoding = Decoding(),
                   with_nbest: bool = False) -> tuple[dict[str, Answer], dict | None]:
    """Answers per example id from the logits of its windows (and the n-best lists if asked)."""
    spans, nbest = decode_spans(examples, features, all_start, all_end, decoding, with_nbest=with_nbest)
    return {qid: Answer(qid, *span) for qid, span in spans.items()}, nbest


def answer_texts(answers: dict[str, Answer]) -> dict[str, str]:
    """{id: text}: the official predictions format."""
    return {qid: answer.text for qid, answer in answers.items()}


def predict_and_score(model, examples, features, collate_fn, *, batch_size: int, device="cpu",
                      decoding: Decoding = Decoding(), autocast_dtype: torch.dtype | None = None, progress: bool = False):
    """Evaluation = prediction + the official metric: (metrics, predictions {id: text}, nbest).

    model: a PyTorch QA model (run in eval mode, its mode restored) or an OnnxQAModel. metrics:
    exact_match, f1 (percent), total, missing, runtime_s (forward + decoding + scoring),
    samples_per_second (features/s, as the HF Trainer counts eval samples), examples_per_second.
    """
    begin = time.perf_counter()
    model = _as_model(model, device, autocast_dtype)
    all_start, all_end = logits_over_features(model, features, collate_fn, batch_size, progress=progress,
                                              desc="evaluating")
    answers, nbest = decode_answers(examples, features, all_start, all_end, decoding,
                                    with_nbest=True)
    predictions = answer_texts(answers)
    metrics = squad_v1_score(examples, predictions)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    runtime = time.perf_counter() - begin
    metrics["runtime_s"] = runtime
    metrics["samples_per_second"] = len(all_start) / runtime if runtime > 0 else float("inf")
    metrics["examples_per_second"] = metrics["total"] / runtime if runtime > 0 else float("inf")
    return metrics, predictions, nbest


# ----------------------------------------------------------------------------- the predictor


class QAPredictor:
    """A model, its tokenizer and the windowing/decoding settings: questions in, Answers out."""

    def __init__(self, model, tokenizer, *, max_seq_length: int = MAX_SEQ_LENGTH, doc_stride: int = DOC_STRIDE,
                 max_query_length: int = MAX_QUERY_LENGTH, n_best_size: int = 20, max_answer_length: int = 30,
                 batch_size: int = 64, pad_to_max_length: bool = False, description: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.window = Window(max_seq_length, doc_stride, max_query_length)
        self.decoding = Decoding(n_best_size, max_answer_length)
        self.batch_size = batch_size
        self.description = description
        # No padding to a multiple of 8 on the CPU: it only helps GPU tensor cores.
        self.collate = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if model.device.type == "cuda" else None,
                                  pad_to_length=max_seq_length if pad_to_max_length else None)

    @classmethod
    def load(cls, path: str, *, runtime: str = "auto", quantize: str = "none", device="cpu",
             autocast_dtype: torch.dtype | None = None, threads: int | None = None,
             attn_implementation: str | None = "sdpa", trained_head: bool = True, **settings) -> "QAPredictor":
        """A model folder ready to answer: PyTorch, or ONNX Runtime for an exported folder / .onnx file.

        runtime "auto": ONNX Runtime when `path` is a .onnx file or a folder with model.onnx, else
        PyTorch. quantize "int8": PyTorch dynamic int8 Linear layers, or the folder's
        model_int8.onnx (written by `train.py export --quantize int8`). trained_head=False lets a
        base model answer from a random QA head (speed measurements only).
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        onnx_file = _onnx_file(path, quantize) if runtime != "torch" else None
        if runtime == "onnxruntime" and onnx_file is None:
            wanted = ONNX_INT8_FILE if quantize == "int8" else ONNX_FILE
            raise ValueError(f"--runtime onnxruntime: {path} has no {wanted}; write it with `python train.py export "
                             f"--model_name_or_path {path} --output_dir {path}"
                             + (" --quantize int8`" if quantize == "int8" else "`"))
        if onnx_file is not None:
            if torch.device(device).type != "cpu":
                raise ValueError(f"ONNX Runtime runs on the CPU here; use --device cpu (got {device})")
            tokenizer = load_tokenizer(os.path.dirname(onnx_file) or ".")
            model = OnnxQAModel(onnx_file, threads=threads)
            what = f"{os.path.basename(onnx_file)} in ONNX Runtime"
        else:
            tokenizer = load_tokenizer(path)
            network = load_qa_model(path, attn_implementation=attn_implementation, trained_head=trained_head)
            if quantize == "int8":
                if torch.device(device).type != "cpu":
                    raise ValueError(f"PyTorch dynamic int8 runs on the CPU only; use --device cpu (got {device})")
                network = quantize_int8(network)
            model = TorchQAModel(network.to(device).eval(), device, autocast_dtype)
            what = f"PyTorch {'int8' if quantize == 'int8' else 'fp32'} on {device}"
        return cls(model, tokenizer, description=f"{path} ({what})", **settings)

    def features(self, examples):
        """The windows of the examples (id, question, context), as in training: a dict of columns
        for up to a thousand examples (a Dataset costs more than tokenising one question), else a Dataset."""
        return prepare_eval_features(examples, self.tokenizer, self.window, as_dataset=False)

    def predict(self, examples, *, with_nbest: bool = False, progress: bool = False):
        """(answers {id: Answer}, nbest {id: [...]} or None) for examples with id, question, context."""
        features = self.features(examples)
        all_start, all_end = logits_over_features(self.model, features, self.collate, self.batch_size,
                                                  progress=progress)
        return decode_answers(examples, features, all_start, all_end, self.decoding, with_nbest=with_nbest)

    def answer(self, question: str, context: str, id: str = "question") -> Answer:
        answers, _ = self.predict({"id": [id], "question": [question], "context": [context]})
        return answers[id]


def _onnx_file(path: str, quantize: str) -> str | None:
    """The ONNX model to run for `path`, or None when it is a PyTorch model folder."""
    if path.endswith(".onnx"):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: ONNX model file not found")
        return path
    candidate = os.path.join(path, ONNX_INT8_FILE if quantize == "int8" else ONNX_FILE)
    return candidate if os.path.isfile(candidate) else None


# ----------------------------------------------------------------------------- files


def write_prediction_outputs(output_dir: str, prefix: str, predictions: dict, nbest: dict | None,
                             metrics: dict | None = None) -> list[str]:
    """run_qa.py's output files: {prefix}_predictions.json (official format {id: text}),
    {prefix}_nbest_predictions.json and, with metrics, {prefix}_results.json. Returns their paths."""
    from .atomic_io import write_json_atomic as write_json

    os.makedirs(output_dir, exist_ok=True)
    texts = {qid: (p.text if isinstance(p, Answer) else p) for qid, p in predictions.items()}
    written = [os.path.join(output_dir, f"{prefix}_predictions.json")]
    write_json(written[-1], texts)
    if nbest is not None:
        written.append(os.path.join(output_dir, f"{prefix}_nbest_predictions.json"))
        write_json(written[-1], nbest)
    if metrics is not None:
        written.append(os.path.join(output_dir, f"{prefix}_results.json"))
        write_json(written[-1], metrics)
    return written


def read_questions_file(path: str):
    """--test_file: SQuAD v1.1 (the layouts kdqa.data reads) or JSON lines of {id, question, context}.

    JSON lines whose first record has no "answers" are questions to answer, read here; everything
    else goes to kdqa.data, which knows the SQuAD layouts and their errors. Both read the file with
    kdqa.data.read_text (gzip, UTF-8 with or without a BOM, errors naming the file).
    """
    from .data import load_squad_json, read_text

    text = read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "data" not in record and "answers" not in record:
        return _read_question_lines(text, path)
    return _scored_only_if_all_answered(load_squad_json(path), path)


def _scored_only_if_all_answered(examples, path: str):
    """The rule `evaluate` follows: a file is scored only when every question has a gold answer (one
    without would score 0 whatever the model says). None has one: answered, not scored. Some: refused."""
    from .data import SquadDataError

    unanswered = sum(1 for gold in examples["answers"] if not gold["text"])
    if unanswered == len(examples):
        logger.info("%s: no question has a gold answer; answering them without a score", path)
        return examples.remove_columns("answers")
    if unanswered:
        raise SquadDataError(
            f"{path}: {unanswered} of {len(examples)} questions have no gold answer, and a question without one "
            "would score 0 whatever the model says (evaluate refuses such a file too). Remove those questions, or "
            "remove every gold answer to have the questions answered without a score."
        )
    return examples


def _read_question_lines(text: str, path: str) -> dict[str, list]:
    """JSON lines of {id, question, context} as columns; errors name the line and the fix."""
    from .data import SquadDataError

    columns = {"id": [], "question": [], "context": []}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SquadDataError(f"{path}: line {number} is not JSON ({err.msg})") from None
        bad = [k for k in columns if not isinstance(record.get(k) if isinstance(record, dict) else None, str)]
        if bad:
            raise SquadDataError(f"{path}: line {number} lacks {bad} as text; each line must be "
                                 '{"id": ..., "question": ..., "context": ...}')
        for key in columns:
            columns[key].append(record[key])
    if not columns["id"]:
        raise SquadDataError(f"{path}: no questions in the file")
    if len(set(columns["id"])) != len(columns["id"]):
        raise SquadDataError(f"{path}: question ids are not unique; give every line its own id")
    return columns


# ----------------------------------------------------------------------------- the commands


def load_predictor(args) -> QAPredictor:
    """The predictor that the flags of `predict`, `evaluate` (and --do_predict after training) ask for.

    Predict-only keys (runtime, quantize) fall back to their defaults: --do_predict and `evaluate`
    pass a Namespace without them.
    """
    from .distributed import resolve_device
    from .precision import resolve_precision  # the loop's own rule, so evaluation matches training

    runtime, quantize = getattr(args, "runtime", "auto"), getattr(args, "quantize", "none")
    device_spec = getattr(args, "device", "auto")
    if device_spec == "auto" and (quantize == "int8" or runtime != "torch" and _onnx_file(args.model_name_or_path,
                                                                                         quantize)):
        device_spec = "cpu"  # ONNX Runtime and PyTorch's dynamic int8 run on the CPU
    device = resolve_device(device_spec)
    autocast_dtype, _ = resolve_precision(getattr(args, "precision", "fp32"), device)
    return QAPredictor.load(
        args.model_name_or_path, runtime=runtime, quantize=quantize, device=device, autocast_dtype=autocast_dtype,
        attn_implementation=getattr(args, "attn_implementation", "sdpa"),
        max_seq_length=args.max_seq_length, doc_stride=args.doc_stride, max_query_length=args.max_query_length,
        n_best_size=args.n_best_size, max_answer_length=args.max_answer_length,
        batch_size=args.per_device_eval_batch_size, pad_to_max_length=getattr(args, "pad_to_max_length", False),
    )


def _has_gold_answers(examples) -> bool:
    return "answers" in (examples.column_names if hasattr(examples, "column_names") else examples)


def _first(examples, n: int | None):
    if n is None:
        return examples
    if hasattr(examples, "select"):
        return examples.select(range(min(n, len(examples))))
    return {k: v[:n] for k, v in examples.items()}


def predict_command(args) -> dict:
    """`train.py predict` (and --do_predict): answer --question/--context, or every question of --test_file.

    With --test_file, writes predict_predictions.json and predict_nbest_predictions.json into
    --output_dir (plus predict_results.json with EM/F1 when the file has gold answers) and returns
    the metrics (or {"questions": n}); with --question/--context prints the answer and returns it.
    """
    quiet_progress_bars(getattr(args, "disable_tqdm", False))
    predictor = load_predictor(args)
    question, context = getattr(args, "question", None), getattr(args, "context", None)
    if question is not None:
        answer = predictor.answer(question, context)
        print(f"answer: {answer.text}")
        print(f"score: {answer.score if answer.score is None else round(answer.score, 4)} "
              f"(characters {answer.start}-{answer.end} of the context)")
        return dataclasses.asdict(answer)
    examples = _first(read_questions_file(args.test_file), getattr(args, "max_predict_samples", None))
    begin = time.perf_counter()
    answers, nbest = predictor.predict(examples, with_nbest=True, progress=not getattr(args, "disable_tqdm", False))
    predictions = answer_texts(answers)
    metrics = squad_v1_score(examples, predictions) if _has_gold_answers(examples) else None
    written = write_prediction_outputs(args.output_dir, "predict", predictions, nbest, metrics)
    logger.info("%s: answered %d questions in %.1f s; wrote %s", predictor.description, len(predictions),
                time.perf_counter() - begin, ", ".join(os.path.basename(p) for p in written))
    return metrics or {"questions": len(predictions)}


def evaluate_command(args) -> dict:
    """`train.py evaluate`: prediction on the dev set + the official metric, eval_* files in --output_dir."""
    from .data import load_squad
    quiet_progress_bars(args.disable_tqdm)
    predictor = load_predictor(args)
    examples = load_squad(validation_file=args.validation_file, dataset_name=args.dataset_name,
                          splits=("validation",))["validation"]
    examples = _first(examples, args.max_eval_samples)
    features = predictor.features(examples)
    metrics, predictions, nbest = predict_and_score(
        predictor.model, examples, features, predictor.collate, batch_size=predictor.batch_size,
        progress=not args.disable_tqdm, decoding=predictor.decoding)
    write_prediction_outputs(args.output_dir, "eval", predictions, nbest, metrics)
    logger.info("%s: exact_match %.2f f1 %.2f on %d questions", predictor.description, metrics["exact_match"],
                metrics["f1"], metrics["total"])
    print(json.dumps({"exact_match": metrics["exact_match"], "f1": metrics["f1"]}))
    return metrics
