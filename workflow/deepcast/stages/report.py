"""The summary of one model on one target: a row per artifact from its validation, the plan with its
refusals, the provenance of each artifact, and a quality-against-size plot.

`deepcast report summary` writes the files Snakemake's report embeds (rules/report.smk);
`deepcast report` prints the same table in the terminal. An artifact whose bundle exists but whose
validation does not (it failed, or has not run) is listed as "not validated", never as passed.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from deepcast import tasks
from deepcast.manifest import Recorder, read

# Bundle folders under a target: GGUF, compressed-tensors, ModelOpt, ONNX Runtime GenAI, Edge-LLM exports.
ENGINE_DIRS = ("llama.cpp", "vllm", "tensorrt-llm", "onnxruntime-genai", "tensorrt-edge-llm")


@dataclass
class Row:
    artifact: str
    format: str
    engine: str
    size_gb: float | None = None
    bits_per_weight: float | None = None
    perplexity: float | None = None
    delta_percent: float | None = None
    kl_divergence: float | None = None
    same_top_token_percent: float | None = None
    decode_tokens_per_s: str = "-"
    smoke: str = "-"
    gate: str = "not validated"
    teacher_kl_divergence: float | None = None  # a distilled student's, against its teacher on the same tokens
    tasks: str = "-"


def _speed(results: dict) -> str:
    speed = results.get("speed") or {}
    bound = speed.get("roofline_decode_tokens_per_s")
    bound_text = f" (roofline <= {bound:,.0f})" if bound else ""
    if speed.get("status") == "measured":
        return f"{speed['decode_tokens_per_s']:,.1f}{bound_text}"
    return f"not measured here{bound_text}"


def _smoke(results: dict) -> str:
    """Deterministic greedy generation: through the bundle's own server (llama-server for GGUF, vLLM where the
    plan serves a checkpoint with it and it ran here), else transformers for checkpoints."""
    if results.get("server", {}).get("deterministic"):
        return "passed (llama-server)"
    if results.get("serving", {}).get("deterministic"):
        return "passed (vllm)"
    smoke = results.get("smoke") or {}
    return f"passed ({smoke['engine']})" if smoke.get("deterministic") else "-"


def task_scores(record: dict | None) -> str:
    """lm-eval figures as one cell: each task's first metric with its standard error, or why none ran."""
    if not record:
        return "-"
    if record.get("status") != "measured":
        return f"skipped: {record.get('reason', '')}"
    cells = []
    for name, score in record["scores"].items():
        error = f" ± {score['stderr']:.2f}" if score["stderr"] is not None else ""
        cells.append(f"{name} {score['metric']} {score['value']:.3f}{error} (n={score['samples']})")
    return "; ".join(cells + [f"{name} skipped" for name in record.get("skipped", {})])


def collect(target_dir: Path, parameters: int) -> list[Row]:
    """One row per bundle under the target's directory, filled from its validation where one exists."""
    rows = []
    for engine_dir in sorted(p for p in target_dir.iterdir() if p.is_dir() and p.name in ENGINE_DIRS):
        for artifact in sorted(p for p in engine_dir.iterdir() if (p / "bundle").is_dir()):
            row = Row(f"{engine_dir.name}/{artifact.name}", artifact.name, engine_dir.name)
            validation = artifact / "validation"
            if (validation / "manifest.json").is_file() and "perplexity" not in read(validation)["results"]:
                results = read(validation)["results"]  # checked here, measured only on the device (Edge-LLM)
                size = results["size_bytes"]
                row.size_gb, row.bits_per_weight = round(size / 1e9, 4), round(size * 8 / parameters, 3)
                row.gate = f"{results['gate']['status']}: {results['gate']['reason']}"
            elif (validation / "manifest.json").is_file():
                results = read(validation)["results"]
                engine = results.get("engine") or engine_dir.name
                reference = results["perplexity_reference"]
                size = results["size_bytes"]
                row = Row(
                    row.artifact, artifact.name, engine, round(size / 1e9, 4), round(size * 8 / parameters, 3),
                    round(results["perplexity"], 4), round((results["perplexity"] / reference - 1) * 100, 3),
                    results.get("kl_divergence"), results.get("same_top_token_percent"), _speed(results),
                    _smoke(results),
                    (results.get("gate") or {}).get("status", "no gate"),
                    (results.get("teacher") or {}).get("kl_divergence"), task_scores(results.get("tasks")),
                )  # fmt: skip
            rows.append(row)
    return rows


COLUMNS = ["artifact", "engine", "size GB", "bits/w", "perplexity", "delta %", "KLD", "top-1 %", "decode tok/s",
           "smoke", "gate", "tasks"]  # fmt: skip
TEACHER_COLUMN = "KLD to teacher"  # shown for a distilled student's artifacts


def _columns(rows: list[Row]) -> list[str]:
    return COLUMNS + ([TEACHER_COLUMN] if any(r.teacher_kl_divergence is not None for r in rows) else [])


def _cells(row: Row, columns: list[str]) -> list[str]:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    cells = [row.artifact, row.engine, number(row.size_gb, ",.3f"), number(row.bits_per_weight, ".2f"),
             number(row.perplexity, ".3f"), number(row.delta_percent, "+.2f"), number(row.kl_divergence, ".4f"),
             number(row.same_top_token_percent, ".1f"), row.decode_tokens_per_s, row.smoke, row.gate,
             row.tasks]  # fmt: skip
    return cells + ([number(row.teacher_kl_divergence, ".4f")] if TEACHER_COLUMN in columns else [])


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = _columns(rows)
    shown = [c for c in columns if c != "tasks"]  # too wide for a terminal row: listed under the table
    for column in shown:
        table.add_column(column)
    for row in rows:
        style = None if row.gate == "passed" else "red" if row.gate in ("not validated", "failed") else "yellow"
        cells = dict(zip(columns, _cells(row, columns), strict=True))
        table.add_row(*(cells[c] for c in shown), style=style)
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for row in (r for r in rows if r.tasks != "-"):
        console.print(f"tasks of {row.artifact}: {row.tasks}", soft_wrap=True)


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:1em} table{border-collapse:collapse;font-size:13px} "
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left} th{background:#eee}")  # fmt: skip
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"  # fmt: skip


def plot(rows: list[Row], reference: float, out: Path, title: str) -> None:
    """Perplexity against size, one point per validated artifact, the reference as a line."""
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for row in (r for r in rows if r.perplexity is not None):
        marker = "o" if row.engine == "llama.cpp" else "s"
        axes.scatter(
            row.size_gb, row.perplexity, marker=marker, color="tab:red" if row.gate != "passed" else "tab:blue"
        )
        axes.annotate(row.format, (row.size_gb, row.perplexity), fontsize=8, xytext=(4, 3), textcoords="offset points")
    axes.axhline(reference, color="gray", linestyle="--", label=f"16-bit reference {reference:.3f}")
    axes.set_xlabel("artifact size (GB)")
    axes.set_ylabel("perplexity on the evaluation split (lower is better)")
    axes.set_title(title)
    axes.margins(x=0.15, y=0.2)
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(out, format="svg")
    plt.close(figure)


def summary(target_dir: Path, plan_file: Path, reference_dir: Path, out: Path) -> dict:
    """table.html, quality-vs-size.svg, plan.html and provenance.html for Snakemake's report."""
    from deepcast.files import atomic_path

    plan = json.loads(plan_file.read_text())
    model, target = plan["model"], plan["target"]
    title = f"{model['name']} on {target['name']}"
    rows = collect(target_dir, model["parameters"])
    reference = json.loads((reference_dir / "perplexity.json").read_text())["perplexity"]
    recorder = Recorder("report_summary", {"target": target["name"], "model": model["name"]})
    recorder.input("plan.json", plan_file)
    engines = plan["chosen_engines"]
    chosen = [c for c in plan["candidates"] if c["viable"] and engines.get(c["format"]) == c["engine"]]
    refused = [c for c in plan["candidates"] if not c["viable"]]
    plan_body = (
        f"<p>{html.escape(target['description'])}; {model['parameters'] / 1e9:,.3f} B parameters "
        f"({html.escape(model['architecture'])}).</p><h3>Chosen</h3>"
        + _html_table(["format", "engine", "weights GB", "placement", "context", "GPU GB each", "tok/s <=", "flags"],
                      [[c["format"], c["engine"], f"{c['weights_gb']:,.3f}", c["placement"], f"{c['context']:,}",
                        f"{c['gpu_memory_gb'] or 0:,.2f}", f"{c['decode_tokens_per_s']:,.1f}", " ".join(c["flags"])]
                       for c in chosen])
        + "<h3>Refused</h3>"
        + _html_table(["format", "engine", "weights GB", "reason"],
                      [[c["format"], c["engine"], f"{c['weights_gb']:,.3f}", c["reason"]] for c in refused])
        + "".join(f"<p>note: {html.escape(n)}</p>" for n in plan["notes"])
    )  # fmt: skip
    provenance = []
    for row in rows:
        validation = target_dir / row.artifact / "validation"
        if (validation / "manifest.json").is_file():
            record = read(validation)
            provenance.append([row.artifact, record.get("command", ""), json.dumps(record.get("tools", {})),
                               json.dumps(record.get("inputs", {}))[:400], record.get("created", "")])  # fmt: skip
        else:
            provenance.append([row.artifact, "not validated", "", "", ""])
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        columns = _columns(rows)
        table = _html_table(columns, [_cells(r, columns) for r in rows])
        sixteen_bit = html.escape(task_scores(tasks.reference_scores(reference_dir)))
        table += f"<p>lm-eval tasks of the 16-bit model on the same items: {sixteen_bit}</p>"
        (tmp / "table.html").write_text(_page(f"Artifacts of {title}", table))
        plot(rows, reference, tmp / "quality-vs-size.svg", f"Quality against size: {title}")
        (tmp / "plan.html").write_text(_page(f"Plan for {title}", plan_body))
        (tmp / "provenance.html").write_text(_page(f"Provenance: {title}", _html_table(
            ["artifact", "command", "tools", "inputs (sha256)", "created"], provenance)))  # fmt: skip
        (tmp / "rows.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        recorder.results = {"artifacts": len(rows), "validated": sum(r.gate != "not validated" for r in rows)}
        recorder.write(tmp)
    return recorder.results
