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
    subjects = build(settings, model, plan, target, config_dir, repo_root)
    return Run(settings, target, model, calibration_file, plan, subjects)
