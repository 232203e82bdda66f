"""What a finished run tells a person: `report.md` / `report.json` beside the model, and a model card.

The report states the objective exactly as it ran (every term, its weight, T and whether T² was
applied, the layer maps, the loss implementation), so that a silently different objective shows at
a glance; its scores are read from the same dictionaries that `eval_results.json` is written from.
The model card (`README.md` in the model folder) follows the Hugging Face hub's format: YAML front
matter with `model-index` results, then prose, so the folder can be uploaded as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from .metric import f1_score, normalize_answer
from .modeling import short_model_name
from .atomic_io import write_json_atomic, write_text_atomic

REPORT_NAMES = ("report.md", "report.json")
MODEL_CARD_NAME = "README.md"


# ----------------------------------------------------------------------------- the pieces

def answer_agreement(student: dict[str, str], teacher: dict[str, str]) -> dict | None:
    """How often the student's answer is the teacher's (after SQuAD's normalisation), and the mean
    token F1 between the two answers, over the questions both answered."""
    shared = [qid for qid in student if qid in teacher]
    if not shared:
        return None
    same = sum(normalize_answer(student[q]) == normalize_answer(teacher[q]) for q in shared)
    return {"questions": len(shared), "same_answer": round(100.0 * same / len(shared), 2),
            "answer_f1": round(100.0 * sum(f1_score(student[q], teacher[q]) for q in shared) / len(shared), 2)}


def gap_closed(model_f1: float, baseline_f1: float, teacher_f1: float) -> float | None:
    """Share of the teacher's lead over the fine-tuned baseline that the model recovered, in %."""
    if teacher_f1 is None or baseline_f1 is None or model_f1 is None or teacher_f1 <= baseline_f1:
        return None
    return round(100.0 * (model_f1 - baseline_f1) / (teacher_f1 - baseline_f1), 1)


def read_json_if_present(path: str):
    """A JSON file a run wrote, or None where there is none or it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def teacher_results(teacher_dir: str | None) -> tuple[dict | None, dict | None]:
    """The teacher's eval_results.json and eval_predictions.json, where its folder holds them."""
    if not teacher_dir or not os.path.isdir(teacher_dir):
        return None, None
    return (read_json_if_present(os.path.join(teacher_dir, "eval_results.json")),
            read_json_if_present(os.path.join(teacher_dir, "eval_predictions.json")))


# ----------------------------------------------------------------------------- the run's report

@dataclass(frozen=True)
class RunFacts:
    """Who a finished finetune/distill run is, as its report and card name it: built once by the
    caller from the command line, so the report reads values, not the parser's Namespace."""
    command: str
    output_dir: str
    model_name_or_path: str | None          # None: the student is --student_layers of the teacher
    teacher_model_name_or_path: str | None
    student_layers: str | None
    distilled: bool                         # a distill run: its teacher is scored and compared


def run_report(run: RunFacts, *, metrics: dict | None, predictions: dict | None, objective: dict, data: dict,
               training: dict) -> dict:
    """The report of one finetune/distill run (see the module docstring)."""
    report = {"command": run.command, "output_dir": os.path.abspath(run.output_dir),
              "model": starting_model(run), "scores": None, "teacher": None,
              "agreement_with_teacher": None, "objective": objective, "data": data, "training": training}
    if metrics:
        report["scores"] = {"exact_match": metrics.get("exact_match"), "f1": metrics.get("f1")}
    teacher = run.teacher_model_name_or_path if run.distilled else None
    if teacher:
        results, teacher_predictions = teacher_results(teacher)
        report["teacher"] = {"model": teacher, "exact_match": (results or {}).get("exact_match"),
                             "f1": (results or {}).get("f1"),
                             "source": "its eval_results.json" if results else "not scored (no eval_results.json)"}
        if predictions and teacher_predictions:
            report["agreement_with_teacher"] = answer_agreement(predictions, teacher_predictions)
    return report


def starting_model(run: RunFacts) -> str:
    """What the run started from: --model_name_or_path, or the teacher's layers it copied."""
    if run.model_name_or_path:
        return run.model_name_or_path
    return f"layers {run.student_layers} of {short_model_name(run.teacher_model_name_or_path)}"


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render_report(report: dict) -> str:
    """report.md: the same facts as report.json, for people."""
    lines = [f"# Report: {report['command']} → {os.path.basename(report['output_dir'])}", ""]
    scores = report.get("scores") or {}
    lines += ["| model | EM | F1 |", "| --- | ---: | ---: |",
              f"| this model ({os.path.basename(report['output_dir'])}, from {short_model_name(report['model'])}) | {_score(scores.get('exact_match'))} | {_score(scores.get('f1'))} |"]
    teacher = report.get("teacher")
    if teacher:
        lines.append(f"| teacher ({short_model_name(teacher['model'])}) | {_score(teacher['exact_match'])} | {_score(teacher['f1'])} |")
    for row in report.get("extra_rows", []):
        lines.append(f"| {row['label']} | {_score(row.get('exact_match'))} | {_score(row.get('f1'))} |")
    lines.append("")
    if report.get("gap_closed") is not None:
        lines.append(f"- gap to the teacher closed against the fine-tuned student: {report['gap_closed']:.1f} %")
    for key, whose in (("agreement_with_teacher", "this model's"),
                       ("source_agreement_with_teacher", "the PyTorch fp32 model's it was exported from")):
        agreement = report.get(key)
        if agreement:
            lines.append(f"- {whose} agreement with the teacher on {agreement['questions']} dev questions: same "
                         f"answer {agreement['same_answer']:.2f} %, F1 between the answers {agreement['answer_f1']:.2f}")
    if report.get("int8"):
        i8 = report["int8"]
        lines.append(f"- served int8 ({i8['runtime']}): {int8_drop_text(i8)}")
    if report.get("speed"):
        sp = report["speed"]
        lines.append(f"- CPU ms/question: {sp['ms_per_question']:.1f} ({sp['threads']} threads, one at a time)")
    lines.append("- data: " + _facts(report.get("data") or {}))
    lines.append("- training: " + _facts(report.get("training") or {}))
    objective = report["objective"]
    lines += ["", "## Objective as run", "", f"`loss = {objective['formula']}`" + _how_it_ran(objective), "",
              "| term | weight | settings |", "| --- | ---: | --- |"]
    for term in objective["terms"]:
        lines.append(f"| {term['name']} | {term['weight']:g} | {_term_settings(term)} |")
    return "\n".join(lines) + "\n"


# Facts as a person writes them: the key's words (where "t_squared".replace("_", " ") would not do),
# and the unit of a number (a key ending in "_s" is in seconds).
FACT_WORDS = {"t_squared": "T² scaling", "max_seq_length": "max sequence length",
              "layer_map (student:teacher)": "layer map (student:teacher)"}
FACT_UNITS = {"max_seq_length": "tokens"}


def _fact(key: str, value) -> str:
    """("wall_time_s", 3.2) -> "wall time: 3.2 s", ("t_squared", True) -> "T² scaling: yes": report.json's
    keys and values in words (no True/False/None, no braces) for report.md and the model card."""
    unit = "s" if key.endswith("_s") else FACT_UNITS.get(key)
    words = FACT_WORDS.get(key) or (key[:-2] if key.endswith("_s") else key).replace("_", " ")
    return f"{words}: {_value(value)}" + (f" {unit}" if unit else "")


def _value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    if isinstance(value, dict):
        return value["text"] if "text" in value else _facts(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_value, value))
    return "none" if value is None else str(value)


def _facts(facts: dict, sep: str = ", ") -> str:
    """{"wall_time_s": 3.2, "epochs": 1} -> "wall time: 3.2 s, epochs: 1" (facts that are None left out);
    a fact with a "text" (the dev sample) by its text."""
    return sep.join(_fact(k, v) for k, v in facts.items() if v is not None)


def _term_settings(term: dict, *, what: bool = True) -> str:
    """A loss term's settings in words: what it is (where `what`), then each setting."""
    settings = _facts({k: v for k, v in term.items() if k not in ("name", "weight", "what")}, "; ")
    return "; ".join(part for part in (term.get("what") if what else None, settings) if part)


def _how_it_ran(objective: dict) -> str:
    """" (loss implementation: torch; teacher logits: online)", the parts the objective records."""
    facts = _facts({"loss_implementation": objective.get("loss_impl"),
                    "teacher_logits": objective.get("teacher_logits")}, "; ")
    return f" ({facts})" if facts else ""


def write_report(output_dir: str, report: dict, markdown: str | None = None) -> list[str]:
    """report.json and report.md (markdown, else render_report's) into output_dir, each atomically."""
    paths = [os.path.join(output_dir, name) for name in REPORT_NAMES]
    write_json_atomic(paths[1], report)
    write_text_atomic(paths[0], render_report(report) if markdown is None else markdown)
    return paths


# ----------------------------------------------------------------------------- the model card

def _card_metadata(report: dict, *, model_name: str, base_model: str | None, license_of_data: str) -> dict:
    """The card's YAML front matter as data: dumped by yaml (any name, any character, stays valid
    YAML and reads back as it was), with a model-index result only where there are scores."""
    scores = report.get("scores") or {}
    sample = (report.get("data") or {}).get("dev_sample") or {}
    meta = {"library_name": "transformers", "pipeline_tag": "question-answering",
            "tags": ["question-answering", "knowledge-distillation" if report.get("teacher") else "fine-tuned",
                     "kdqa"],
            "datasets": ["rajpurkar/squad"], "license": license_of_data}
    if base_model and not os.path.isabs(base_model) and not os.path.exists(base_model):
        meta["base_model"] = base_model
    metrics = [{"type": key, "value": round(float(scores[key]), 2), "name": name}
               for key, name in (("exact_match", "Exact match"), ("f1", "F1")) if scores.get(key) is not None]
    if metrics:
        dataset = {"type": "rajpurkar/squad", "name": "SQuAD v1.1", "split": sample.get("split", "validation")}
        if sample.get("how") in ("spread", "first"):
            dataset["name"] = f"SQuAD v1.1 ({sample['text']})"
            dataset["args"] = {"questions": sample["questions"], "of": sample["of"], "sample": sample["how"]}
        meta["model-index"] = [{"name": model_name, "results": [{
            "task": {"type": "question-answering", "name": "Extractive question answering"},
            "dataset": dataset, "metrics": metrics}]}]
    return meta


def model_card(report: dict, *, model_name: str, base_model: str | None, license_of_data: str = "cc-by-sa-4.0") -> str:
    """A Hugging Face hub model card (README.md): YAML front matter with model-index, then prose."""
    meta = _card_metadata(report, model_name=model_name, base_model=base_model, license_of_data=license_of_data)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1_000_000)
    scores = report.get("scores") or {}
    teacher = report.get("teacher")
    how = f"distilled from the teacher `{short_model_name(teacher['model'])}`" if teacher else "fine-tuned"
    if base_model:
        how += f", starting from `{short_model_name(base_model)}`"
    data = report.get("data") or {}
    scored = (data.get("dev_sample") or {}).get("text") or f"{data.get('dev_questions', 'the')} dev questions"
    body = [f"# {model_name}", "",
            f"An extractive question-answering model (SQuAD v1.1), {how} with kdqa.", "",
            "## Scores", "",
            (f"SQuAD v1.1 dev, official metric, on {scored}: "
             f"EM {_score(scores.get('exact_match'))}, F1 {_score(scores.get('f1'))}." if scores.get("f1") is not None
             else "Not scored: the run evaluated no dev questions."), "",
            "## How it was trained", "", render_report(report).split("\n", 2)[2],
            "The data (SQuAD v1.1) is licensed CC BY-SA 4.0."]
    return "---\n" + front + "---\n\n" + "\n".join(body) + "\n"


def write_model_card(model_dir: str, report: dict, *, model_name: str, base_model: str | None) -> str:
    path = os.path.join(model_dir, MODEL_CARD_NAME)
    write_text_atomic(path, model_card(report, model_name=model_name, base_model=base_model))
    return path


def write_run_report_and_card(run: RunFacts, **parts) -> dict:
    """A finished finetune/distill run: report.md/report.json, and the model card in its model folder;
    parts: run_report's metrics, predictions, objective, data and training."""
    report = run_report(run, **parts)
    write_report(run.output_dir, report)
    name = os.path.basename(os.path.normpath(os.path.abspath(run.output_dir)))
    write_model_card(run.output_dir, report, model_name=name,
                     base_model=run.model_name_or_path or run.teacher_model_name_or_path)
    return report


# ----------------------------------------------------------------------------- the served (int8) model

def int8_drop(int8_results: dict, model_results: dict, runtime: str) -> dict:
    """The int8 export's scores and what int8 cost on the same questions: the drop is the PyTorch
    model's EM/F1 minus the int8 one's (negative where int8 scored higher)."""
    return {"runtime": runtime, "exact_match": int8_results.get("exact_match"), "f1": int8_results.get("f1"),
            "pytorch_exact_match": model_results["exact_match"], "pytorch_f1": model_results["f1"],
            "f1_drop": _drop(model_results["f1"], int8_results["f1"]),
            "exact_match_drop": _drop(model_results["exact_match"], int8_results["exact_match"])}


def _drop(pytorch: float, int8: float) -> float:
    return round(pytorch - int8, 2) or 0.0  # or 0.0: no "-0.00" when the two are equal


def int8_drop_text(i8: dict) -> str:
    """"int8 drop 2.48 F1 (26.04 against 28.52 in PyTorch), 3.20 EM (...)": a drop is PyTorch minus
    int8 (a negative one is a gain); both scores are shown so the direction cannot be misread."""
    def side(key: str, name: str) -> str:
        return f"{i8[f'{key}_drop']:.2f} {name} ({i8[key]:.2f} against {i8[f'pytorch_{key}']:.2f} in PyTorch)"

    return f"int8 drop {side('f1', 'F1')}, {side('exact_match', 'EM')}"


def write_served_report_and_card(served_dir: str, source_dir: str, runtime: str) -> dict:
    """An exported folder scored on the dev questions (its eval_results.json): its report and model card,
    the source run's report (objective, data, training) with the int8 scores and the int8 drop."""
    served = read_json_if_present(os.path.join(served_dir, "eval_results.json"))
    source = read_json_if_present(os.path.join(source_dir, "eval_results.json"))
    report = dict(read_json_if_present(os.path.join(source_dir, "report.json")) or {})
    report.setdefault("objective", {"terms": [], "formula": "n/a (no report.json in the source folder)"})
    report.setdefault("model", source_dir)
    report.update(command="export --quantize int8", output_dir=os.path.abspath(served_dir),
                  scores={"exact_match": served.get("exact_match"), "f1": served.get("f1")},
                  int8=int8_drop(served, source, runtime),
                  extra_rows=[{"label": f"PyTorch fp32 ({os.path.basename(os.path.normpath(source_dir))})",
                               "exact_match": source.get("exact_match"), "f1": source.get("f1")}])
    report.setdefault("data", {})
    report.setdefault("training", {})
    report["agreement_with_teacher"], report["source_agreement_with_teacher"] = _served_agreement(
        served_dir, source_dir, report.get("teacher"))
    write_report(served_dir, report)
    write_model_card(served_dir, report, model_name=os.path.basename(os.path.normpath(os.path.abspath(served_dir))),
                     base_model=report["model"])
    return report


def _served_agreement(served_dir: str, source_dir: str, teacher: dict | None) -> tuple[dict | None, dict | None]:
    """(the served model's own agreement with the teacher, the fp32 source's): each model's figure is
    computed from its own eval_predictions.json, never copied from the other's report."""
    _, teacher_predictions = teacher_results((teacher or {}).get("model"))
    if not teacher_predictions:
        return None, None
    ours = read_json_if_present(os.path.join(served_dir, "eval_predictions.json"))
    source = read_json_if_present(os.path.join(source_dir, "eval_predictions.json"))
    return (ours and answer_agreement(ours, teacher_predictions),
            source and answer_agreement(source, teacher_predictions))


# ----------------------------------------------------------------------------- the recipe's report

def recipe_report(rows: dict, stage_dirs: dict[str, str], *, threads: int, speed_questions: int,
                  elapsed_s: float, baseline: str = "student", teacher: str = "teacher",
                  dev_sample: dict | None = None) -> dict:
    """The recipe's report: each model's scores and speed (the table's rows), the gap to the teacher
    each distilled model closed against the fine-tuned `baseline`, each student's agreement with the
    teacher's answers, and each stage's own report (its objective as run)."""
    teacher_f1, baseline_f1 = rows[teacher]["f1"], rows.get(baseline, {}).get("f1")
    teacher_predictions = read_json_if_present(os.path.join(stage_dirs[teacher], "eval_predictions.json"))
    models = {}
    for name, row in rows.items():
        stage_dir = stage_dirs.get(name)
        entry = dict(row)
        if name not in (teacher, baseline):
            entry["gap_closed"] = gap_closed(row["f1"], baseline_f1, teacher_f1)
        if name != teacher and stage_dir and teacher_predictions:
            predictions = read_json_if_present(os.path.join(stage_dir, "eval_predictions.json"))
            entry["agreement_with_teacher"] = predictions and answer_agreement(predictions, teacher_predictions)
        if stage_dir:
            stage_report = read_json_if_present(os.path.join(stage_dir, "report.json")) or {}
            entry["objective"] = stage_report.get("objective")
            entry["data"], entry["training"] = stage_report.get("data"), stage_report.get("training")
            if stage_report.get("int8"):
                entry["int8"] = stage_report["int8"]
        models[name] = entry
    return {"models": models, "speed_test": {"questions": speed_questions, "threads": threads, "device": "cpu"},
            "elapsed_s": round(elapsed_s, 1), "dev_sample": dev_sample}


def render_recipe_report(report: dict) -> str:
    sp = report["speed_test"]
    lines = ["# Report: the recipe", "",
             f"| model | EM | F1 | gap to the teacher closed | same answer as the teacher | answer F1 vs the teacher "
             f"| CPU ms/question ({sp['threads']} threads) | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in report["models"].values():
        gap = entry.get("gap_closed")
        agreement = entry.get("agreement_with_teacher") or {}
        cells = [entry["label"], _score(entry.get("exact_match")), _score(entry.get("f1")),
                 "" if gap is None else f"{gap:.1f} %",
                 "" if not agreement else f"{agreement['same_answer']:.2f} %",
                 "" if not agreement else f"{agreement['answer_f1']:.2f}",
                 f"{entry['ms_per_question']:.1f}", f"{entry['speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    drops = [f"- {entry['label']}: {int8_drop_text(entry['int8'])}"
             for entry in report["models"].values() if entry.get("int8")]
    lines += [""] + drops if drops else []
    if report.get("dev_sample"):
        lines += ["", f"EM/F1 on {report['dev_sample']['text']}."]
    lines += ["", f"Speed: {sp['questions']} dev questions answered one at a time on the CPU with {sp['threads']} "
              f"threads. Whole recipe: {report['elapsed_s'] / 60:.1f} minutes.", ""]
    for entry in report["models"].values():
        if not entry.get("objective"):
            continue
        lines += [f"## {entry['label']}", "",
                  f"- objective: `loss = {entry['objective']['formula']}`" + _how_it_ran(entry["objective"])]
        for term in entry["objective"]["terms"]:
            if term["weight"] and term["name"] not in ("ce",):
                lines.append(f"  - {term['name']} × {term['weight']:g}: {_term_settings(term, what=False)}")
        lines.append("- data: " + _facts(entry.get("data") or {}))
        lines += ["- training: " + _facts(entry.get("training") or {}), ""]
    return "\n".join(lines)


def write_recipe_report(output_dir: str, report: dict) -> list[str]:
    return write_report(output_dir, report, render_recipe_report(report))
