"""The one inference path: a model -> answers to (question, context) pairs, with text, score and
character offsets.

Everything that answers questions goes through here, so every number kdqa reports comes from the
same code: the training loop's evaluation and `train.py evaluate` (`QAPredictor.evaluate`: prediction
plus the official metric), `train.py predict` (`QAPredictor.predict`), the recipe's speed test
(kdqa.speedtest, which times the predictor's stages) and benchmarks/bench_inference.py. PyTorch
and ONNX Runtime are two runners of one interface (`TorchRunner`, `OnnxRunner`).

    predictor = QAPredictor.load("runs/student")                 # PyTorch fp32
    predictor = QAPredictor.load("runs/student", quantize="int8")  # PyTorch dynamic int8 Linear layers
    predictor = QAPredictor.load("runs/student-onnx")            # ONNX Runtime (the folder has model.onnx)
    predictor.answer("Who wrote it?", "It was written by Ada.")  # -> Answer(id=..., text="Ada", score=..., start=18, end=21)
    metrics, predictions, nbest = predictor.evaluate(dev_examples)  # + EM/F1

The steps: windows as in training (`features.prepare_eval_features`: question + overlapping context
windows of max_seq_length tokens), the model over length-sorted batches (little padding), span
decoding over all windows of a question (`postprocess.decode_answers`). Gold answers are never
needed; when the examples have them, `QAPredictor.evaluate` adds EM/F1.
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

from .atomic_io import write_json_atomic
from .choices import PREDICT_QUANTIZE, RUNTIMES
from .data import load_squad, read_questions_file
from .dev_sample import DEFAULT_EVAL_SAMPLE, take_sample
from .features import QACollator, Window, prepare_eval_features
from .metric import squad_v1_score
from .modeling import ModelLoadError, forward_qa, load_qa_model, load_tokenizer, logits_over_features
from .postprocess import Answer, Decoding, answer_texts, decode_answers
from .reporting import quiet_progress_bars

logger = logging.getLogger("kdqa")

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_int8.onnx"


# ----------------------------------------------------------------------------- the runners
# One interface for both runtimes: runner(batch) -> (start, end) logits [B, L] for a collated batch
# of model inputs; runner.device and runner.autocast_dtype say where and how it runs; runner.module
# is the PyTorch module (run in eval mode, its mode restored, by modeling.logits_over_features) or None.


class TorchRunner:
    """A PyTorch QA model with the device and autocast dtype it answers with."""

    def __init__(self, model: torch.nn.Module, device="cpu", autocast_dtype: torch.dtype | None = None):
        self.module = model
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_qa(self.module, batch).logits


class OnnxRunner:
    """An exported model (kdqa.export) in ONNX Runtime.

    Tuned for answering questions one at a time on a CPU: full graph optimisation, `threads`
    intra-op threads (default: ONNX Runtime's, one per physical core), sequential execution.
    """

    module = None
    autocast_dtype = None

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


# ----------------------------------------------------------------------------- the predictor


def _numpy(logits) -> np.ndarray:
    return logits.float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, dtype=np.float32)


class QAPredictor:
    """A runner, its tokenizer, the window and the decoding: questions in, Answers (and EM/F1) out.

    The stages are methods so that the speed test can time each one: `features` (the windows),
    `logits` (the runner over length-sorted batches), `decode` (span decoding); `predict` and
    `evaluate` are the three in a row. `collate` defaults to dynamic padding (to a multiple of 8
    on CUDA only: it helps tensor cores, not the CPU); the trainer passes its own collator.
    """

    def __init__(self, runner, tokenizer, window: Window = Window(), decoding: Decoding = Decoding(), *,
                 batch_size: int = 64, pad_to_max_length: bool = False, collate=None, description: str = ""):
        self.runner = runner
        self.tokenizer = tokenizer
        self.window = window
        self.decoding = decoding
        self.batch_size = batch_size
        self.description = description
        self.collate = collate or QACollator(
            tokenizer.pad_token_id, pad_to_multiple_of=8 if runner.device.type == "cuda" else None,
            pad_to_length=window.max_seq_length if pad_to_max_length else None)

    @classmethod
    def load(cls, path: str, *, runtime: str = "auto", quantize: str = "none", device="cpu",
             autocast_dtype: torch.dtype | None = None, threads: int | None = None,
             attn_implementation: str | None = "sdpa", trained_head: bool = True, **settings) -> "QAPredictor":
        """A model folder ready to answer: PyTorch, or ONNX Runtime for an exported folder / .onnx file.

        runtime "auto": ONNX Runtime when `path` is a .onnx file or a folder with model.onnx, else
        PyTorch. quantize "int8": PyTorch dynamic int8 Linear layers, or the folder's
        model_int8.onnx (written by `train.py export --quantize int8`). trained_head=False lets a
        base model answer from a random QA head (speed measurements only). settings: the
        constructor's (window, decoding, batch_size, pad_to_max_length).
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if quantize not in PREDICT_QUANTIZE:
            raise ValueError(f"quantize must be one of {PREDICT_QUANTIZE}, got {quantize!r}")
        onnx_file = _onnx_file(path, quantize) if runtime != "torch" else None
        if onnx_file is None and (runtime == "onnxruntime" or runtime == "auto" and _only_int8_export(path, quantize)):
            raise ValueError(_no_onnx_file(path, quantize, runtime))
        if onnx_file is not None:
            if torch.device(device).type != "cpu":
                raise ValueError(f"ONNX Runtime runs on the CPU here; use --device cpu (got {device})")
            tokenizer = load_tokenizer(os.path.dirname(onnx_file) or ".")
            runner = OnnxRunner(onnx_file, threads=threads)
            what = f"{os.path.basename(onnx_file)} in ONNX Runtime"
        else:
            tokenizer = load_tokenizer(path)
            network = load_qa_model(path, attn_implementation=attn_implementation, trained_head=trained_head)
            if quantize == "int8":
                if torch.device(device).type != "cpu":
                    raise ValueError(f"PyTorch dynamic int8 runs on the CPU only; use --device cpu (got {device})")
                network = quantize_int8(network)
            runner = TorchRunner(network.to(device).eval(), device, autocast_dtype)
            what = f"PyTorch {'int8' if quantize == 'int8' else 'fp32'} on {device}"
        return cls(runner, tokenizer, description=f"{path} ({what})", **settings)

    def features(self, examples):
        """The windows of the examples (id, question, context), as in training: a dict of columns
        for up to a thousand examples (a Dataset costs more than tokenising one question), else a Dataset."""
        return prepare_eval_features(examples, self.tokenizer, self.window, as_dataset=False)

    def logits(self, features, *, progress: bool = False,
               desc: str = "predicting") -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits per feature, unpadded float32 arrays in feature order."""
        starts: dict[int, np.ndarray] = {}
        ends: dict[int, np.ndarray] = {}

        def keep(indices, lengths, start_logits, end_logits):
            start_logits, end_logits = _numpy(start_logits), _numpy(end_logits)
            for j, (i, n) in enumerate(zip(indices.tolist(), lengths.tolist())):
                starts[i], ends[i] = start_logits[j, :n].copy(), end_logits[j, :n].copy()

        logits_over_features(self.runner, features, self.collate, keep, batch_size=self.batch_size,
                             device=self.runner.device, autocast_dtype=self.runner.autocast_dtype,
                             progress=progress, desc=desc)
        return [starts[i] for i in range(len(starts))], [ends[i] for i in range(len(ends))]

    def decode(self, examples, features, starts, ends, *, with_nbest: bool = False):
        """(answers {id: Answer}, nbest {id: [...]} or None) from the logits of the examples' windows."""
        return decode_answers(examples, features, starts, ends, self.decoding, with_nbest=with_nbest)

    def predict(self, examples, *, features=None, with_nbest: bool = False, progress: bool = False):
        """(answers {id: Answer}, nbest or None) for examples with id, question, context; `features`:
        their windows when already made (the trainer makes them once)."""
        features = self.features(examples) if features is None else features
        starts, ends = self.logits(features, progress=progress)
        return self.decode(examples, features, starts, ends, with_nbest=with_nbest)

    def evaluate(self, examples, *, features=None, progress: bool = False):
        """Prediction + the official metric: (metrics, predictions {id: text}, nbest).

        metrics: exact_match, f1 (percent), total, missing, runtime_s (forward + decoding + scoring,
        not the windows), samples_per_second (features/s, as the HF Trainer counts eval samples),
        examples_per_second. A PyTorch model runs in eval mode, its mode restored.
        """
        features = self.features(examples) if features is None else features
        begin = time.perf_counter()
        starts, ends = self.logits(features, progress=progress, desc="evaluating")
        answers, nbest = self.decode(examples, features, starts, ends, with_nbest=True)
        predictions = answer_texts(answers)
        metrics = squad_v1_score(examples, predictions)
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        runtime = time.perf_counter() - begin
        metrics["runtime_s"] = runtime
        metrics["samples_per_second"] = len(starts) / runtime if runtime > 0 else float("inf")
        metrics["examples_per_second"] = metrics["total"] / runtime if runtime > 0 else float("inf")
        return metrics, predictions, nbest

    def answer(self, question: str, context: str, id: str = "question") -> Answer:
        answers, _ = self.predict({"id": [id], "question": [question], "context": [context]})
        return answers[id]


def _no_onnx_file(path: str, quantize: str, runtime: str) -> str:
    """ONNX Runtime asked for (or the only model there) on a folder without the model asked for: the flag
    that runs the one it has, or the export that writes it."""
    wanted, other = (ONNX_INT8_FILE, ONNX_FILE) if quantize == "int8" else (ONNX_FILE, ONNX_INT8_FILE)
    head = f"{'--runtime onnxruntime: ' if runtime == 'onnxruntime' else ''}{path} has no {wanted}"
    export = (f"`python train.py export --model_name_or_path MODEL_DIR --output_dir {path}"
              + (" --quantize int8`" if quantize == "int8" else "`"))
    if os.path.isfile(os.path.join(path, other)):
        flag = "leave out --quantize int8" if quantize == "int8" else "add --quantize int8"
        return f"{head}, only {other}: {flag} to run it, or write {wanted} with {export}"
    return f"{head}; write it with {export.replace('MODEL_DIR', path)}"


def _only_int8_export(path: str, quantize: str) -> bool:
    """A folder holding model_int8.onnx and neither model.onnx nor PyTorch weights, run without --quantize int8."""
    return quantize != "int8" and os.path.isfile(os.path.join(path, ONNX_INT8_FILE)) and not any(
        os.path.exists(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json",
                                                             "pytorch_model.bin", "pytorch_model.bin.index.json"))


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
    os.makedirs(output_dir, exist_ok=True)
    texts = {qid: (p.text if isinstance(p, Answer) else p) for qid, p in predictions.items()}
    written = [os.path.join(output_dir, f"{prefix}_predictions.json")]
    write_json_atomic(written[-1], texts)
    if nbest is not None:
        written.append(os.path.join(output_dir, f"{prefix}_nbest_predictions.json"))
        write_json_atomic(written[-1], nbest)
    if metrics is not None:
        written.append(os.path.join(output_dir, f"{prefix}_results.json"))
        write_json_atomic(written[-1], metrics)
    return written


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
        window=Window.from_args(args), decoding=Decoding.from_args(args), batch_size=args.per_device_eval_batch_size, pad_to_max_length=getattr(args, "pad_to_max_length", False),
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
    quiet_progress_bars(args.disable_tqdm)
    predictor = load_predictor(args)
    examples = load_squad(validation_file=args.validation_file, dataset_name=args.dataset_name,
                          splits=("validation",))["validation"]
    examples, sample = take_sample(examples, args.max_eval_samples, getattr(args, "eval_sample", DEFAULT_EVAL_SAMPLE))
    logger.info("dev set: %s", sample.text())
    metrics, predictions, nbest = predictor.evaluate(examples, progress=not args.disable_tqdm)
    write_prediction_outputs(args.output_dir, "eval", predictions, nbest, metrics)
    logger.info("%s: exact_match %.2f f1 %.2f on %d questions", predictor.description, metrics["exact_match"],
                metrics["f1"], metrics["total"])
    print(json.dumps({"exact_match": metrics["exact_match"], "f1": metrics["f1"]}))
    return metrics
