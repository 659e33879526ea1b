"""The models one run builds artifacts for: the configured model and, with distillation on, each student
and its same-budget control. Each has its own results folder and its own plan for the target; the
rules see them through one lookup by name.

A student's revision is a digest of its teacher's revision, its spec and its training settings, so a
change to any of them builds a new student beside the old one instead of overwriting it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deepcast import layout
from deepcast.config import Settings, StudentSpec, source_file
from deepcast.registry import ModelRef, Target, resolve_model
from deepcast.stages import distill
from deepcast.stages import plan as planning


@dataclass
class Subject:
    ref: ModelRef
    plan: planning.Plan
    student: StudentSpec | None = None  # None for the configured model itself
    alpha: float | None = None  # the student's KD weight; 0 for a control
    base: ModelRef | None = None  # an hf student's downloaded starting checkpoint
    method: str | None = None  # logits or sequences

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def chosen(self) -> dict:
        return {candidate.format: candidate for candidate in self.plan.require_chosen()}


def teacher_config(ref: ModelRef, downloaded: Path) -> dict:
    """The teacher's config.json: from its local source, its download, or one hub request."""
    for directory in (ref.local_path, downloaded):
        if directory and (Path(directory) / "config.json").is_file():
            return json.loads((Path(directory) / "config.json").read_text())
    return planning.fetch_config(ref.hub_id, ref.revision)


def build(settings: Settings, teacher: ModelRef, teacher_plan: planning.Plan, target: Target, config_dir: Path,
          repo_root: Path) -> dict[str, Subject]:  # fmt: skip
    """Every model of the run by name, the configured one first; refuses a bad student before any work."""
    subjects = {teacher.name: Subject(teacher, teacher_plan)}
    options = settings.distill
    if not options.students:
        return subjects
    source_file(options.source, "distill")
    parent = teacher_config(teacher, Path(layout.model_dir(teacher)) / "checkpoint")
    distill.check_top_k(options, parent)
    distill.check_disk(options, Path("results"))
    for spec in options.students:
        method = distill.method_of(spec, options)
        distill.check_student(spec, parent)
        base = resolve_model(config_dir, spec.source, repo_root) if spec.source else None
        if base is not None:
            shape_model = planning.plan_model(base, Path(layout.model_dir(base)) / "checkpoint")
        else:
            shape_model = planning.model_from_config(spec.name, distill.student_config(spec, parent), "distill spec")
        alphas = {spec.name: options.loss.alpha}
        if options.control and method == "logits":
            alphas[spec.name + distill.CONTROL_SUFFIX] = 0.0
        for name, alpha in alphas.items():
            digest = distill.student_digest(teacher.name, teacher.revision, spec, distill.run_settings(options, alpha))
            model = planning.PlanModel(name, shape_model.architecture, shape_model.shape, "bfloat16", "distill spec")
            plan = planning.plan_for(model, target, config_dir, *settings.menu(), **settings.preferences())
            plan.require_chosen()
            subjects[name] = Subject(ModelRef(name, digest), plan, spec, alpha, base, method)
    return subjects


@dataclass
class Run:
    """What the Snakefile decides before any job: the typed settings, the target, the model, its plan and every
    subject. Built by `prepare`, which the workflow and the config property test both call."""

    settings: Settings
    target: Target
    model: ModelRef
    calibration_file: Path | None
    plan: planning.Plan
    subjects: dict[str, Subject]


def prepare(config: dict, config_dir: Path, repo_root: Path) -> Run:
    """Validate `config` and plan the run; bad input raises one DeepcastError naming what to fix."""
    from deepcast import config as settings_module
    from deepcast.registry import load_target

    settings = settings_module.load(config)
    target = load_target(config_dir, settings.target)
    model = resolve_model(config_dir, settings.model, repo_root)
    calibration_file = settings_module.calibration_source_file(settings.calibration)
    plan = planning.plan_for(
        planning.plan_model(model, Path(layout.model_dir(model)) / "checkpoint"),
        target,
        config_dir,
        *settings.menu(),
        **settings.preferences(),
    )
    plan.require_chosen()
    check_buildable(settings, plan)
    subjects = build(settings, model, plan, target, config_dir, repo_root)
    return Run(settings, target, model, calibration_file, plan, subjects)


def check_buildable(settings: Settings, plan: planning.Plan) -> None:
    """What a stage would refuse hours in, refused before any job: an importance-matrix type without the
    imatrix, a --tensor-type override llama-quantize cannot read, a recipe the plan builds with or a llama.cpp
    build that is not there."""
    import re

    from deepcast.errors import DeepcastError
    from deepcast.planner import NEEDS_IMATRIX
    from deepcast.sizes import GGML_BLOCK

    chosen = [c.format for c in plan.chosen if c.kind == "gguf"]
    unmatrixed = [t for t in chosen if t in NEEDS_IMATRIX and not settings.gguf.imatrix]
    unmatrixed += [t.upper() for t in settings.gguf.controls if t.upper() in NEEDS_IMATRIX and t.upper() in chosen]
    if unmatrixed:
        names = sorted(set(unmatrixed))
        raise DeepcastError(
            f"{', '.join(names)} {'needs' if len(names) == 1 else 'need'} an importance matrix: llama-quantize "
            "refuses it without one. Fix: set gguf.imatrix: true (and drop it from gguf.controls), or another type."
        )
    for qtype, overrides in settings.gguf.tensor_types.items():
        for override in overrides:
            pattern, _, ggml_type = override.rpartition("=")
            reason = None
            if not pattern:
                reason = "there is no pattern before '='"
            elif ggml_type.upper() not in GGML_BLOCK:
                reason = f"{ggml_type!r} is not a ggml type the planner sizes ({', '.join(GGML_BLOCK)})"
            else:
                try:
                    re.compile(pattern)
                except re.error as error:
                    reason = f"its pattern does not compile ({error})"
            if reason:
                raise DeepcastError(
                    f"gguf.tensor_types.{qtype}: {override!r} is not a regex=TYPE override: {reason}. "
                    "Fix: write it as for example attn_=Q6_K."
                )
    built = [c.format for c in plan.chosen if c.kind == "compressed"]
    built += settings.compress.controls if built else []
    for scheme, recipe in settings.compress.recipes.items():
        if scheme in built and not Path(recipe).expanduser().is_file():
            raise DeepcastError(f"compress.recipes.{scheme}: {recipe} does not exist. Fix: give the recipe's path.")
    if settings.tools.llama_cpp and not Path(settings.tools.llama_cpp).expanduser().is_dir():
        raise DeepcastError(
            f"tools.llama_cpp: {settings.tools.llama_cpp} is not a directory. "
            "Fix: point it at a llama.cpp build (`deepcast tools install llama.cpp` makes one), or leave it unset."
        )
