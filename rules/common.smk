# Configuration, the chosen model and target, and the path helpers every rule uses.
# The logic lives in the deepcast package; this file only calls it.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from deepcast import fingerprint
from deepcast import layout
from deepcast import resources as job_resources
from deepcast.stages import distill as distillation
from deepcast import registry
from deepcast import subjects as run_subjects
from deepcast import tasks as lm_eval_tasks
from deepcast.corpus import SHAKESPEARE
from deepcast.errors import DeepcastError
from deepcast.stages.compress import SCHEMES as COMPRESS_SCHEMES
from deepcast.stages.gguf import BASE_TYPES as GGUF_BASE_TYPES
from deepcast.stages.gguf import SIXTEEN_BIT
from deepcast.stages.onnx import PRECISION as ONNX_FORMATS
from deepcast.stages.onnx import provider_for
from deepcast.stages.plan import EDGELLM as EDGELLM_FORMATS
from deepcast.stages.trtllm import FORMATS as TRTLLM_FORMATS

CONFIG_DIR = str(Path(workflow.basedir) / "config")

try:
    RUN = run_subjects.prepare(config, Path(CONFIG_DIR), Path(workflow.basedir))
except DeepcastError as error:
    raise WorkflowError(f"deepcast: {error}") from None
SETTINGS, TARGET, MODEL, PLAN = RUN.settings, RUN.target, RUN.model, RUN.plan
CALIBRATION_FILE = RUN.calibration_file
# The configured model first, then each distilled student and its control: every one of them is
# taken through the same downstream rules, under its own results folder and its own plan.
SUBJECTS = RUN.subjects

# --config passes nested values as strings ("8"); the typed settings have coerced them,
# so the config every rule sees is the validated, typed one.
config.update(SETTINGS.model_dump(mode="json", by_alias=True))
# The typed settings have filled every default already.
validate(config, "../workflow/schemas/config.schema.json", set_default=False)

CORPUS_DIR = f"results/corpus/{SHAKESPEARE.name}"
# A change to the target's profile reruns only the steps that read it.
TARGET_PROFILE_DIGEST = registry.target_digest(Path(CONFIG_DIR), TARGET.name)
LLAMA_CPP_OPTION = f"--llama-cpp {SETTINGS.tools.llama_cpp}" if SETTINGS.tools.llama_cpp else ""
NO_IMATRIX = "-noimat"


STUDENTS = {name: s for name, s in SUBJECTS.items() if s.student is not None}
# What the download step fetches: the configured model and the starting checkpoints of hf students.
DOWNLOADS = {MODEL.name: MODEL} | {s.base.name: s.base for s in STUDENTS.values() if s.base}
DOWNLOADED_MODELS = layout.alternatives(list(DOWNLOADS))
STUDENT_MODELS = layout.alternatives(list(STUDENTS))
TEACHER_MODEL = layout.alternatives([MODEL.name])


wildcard_constraints:
    model=layout.alternatives(list(SUBJECTS) + list(DOWNLOADS)),
    revision=layout.alternatives(
        [s.ref.path_revision for s in SUBJECTS.values()]
        + [ref.path_revision for ref in DOWNLOADS.values()]
    ),
    target=TARGET.name,
    dtype="|".join(GGUF_BASE_TYPES),
    quant="[A-Z0-9_]+(-noimat)?",
    scheme="|".join(COMPRESS_SCHEMES),
    trtllm_format="|".join(TRTLLM_FORMATS),
    onnx_format="|".join(ONNX_FORMATS),
    edgellm_format="|".join(EDGELLM_FORMATS),
    provider="cpu|cuda",


def subject(wildcards):
    return SUBJECTS[wildcards.model]


# What a cluster's scheduler needs per job (deepcast.resources): GPUs from the plan on a GPU target, host
# memory from the model's size. Threads: every core of a local run; on a cluster (no --cores) the profile's
# set-threads decide, and CLUSTER_THREADS stands where it names none.
CLUSTER_THREADS = 8
ALL_CORES = workflow.resource_settings.cores or CLUSTER_THREADS
ONE_GPU = job_resources.one_gpu(TARGET)


def plan_model_of(wildcards):
    """The plan's model for a job: its subject's, or the configured model's for a downloaded student base."""
    return SUBJECTS[wildcards.model].plan.model if wildcards.model in SUBJECTS else PLAN.model


def host_memory(cpu, gpu, overhead_gb=job_resources.TORCH_OVERHEAD_GB):
    """mem_mb of a job holding `cpu` (CPU target) or `gpu` (GPU target) copies of its model's 16-bit weights."""
    copies = gpu if TARGET.gpu else cpu

    def mem_mb(wildcards):
        return job_resources.host_memory_mb(plan_model_of(wildcards), copies, overhead_gb)

    return mem_mb


def gguf_base_gpus(wildcards):
    """The GPUs llama.cpp spreads the 16-bit GGUF over (imatrix, KLD base)."""
    return job_resources.gpus_holding(
        TARGET, job_resources.sixteen_bit_gb(plan_model_of(wildcards))
    )


def gguf_validate_gpus(wildcards):
    return job_resources.placed_gpus(TARGET, gguf_candidate(wildcards))


def gguf_validate_memory(wildcards):
    return job_resources.served_memory_mb(gguf_candidate(wildcards))


def trtllm_validate_gpus(wildcards):
    return job_resources.placed_gpus(TARGET, subject(wildcards).chosen[wildcards.trtllm_format])


def model_dir(name=MODEL.name):
    return layout.model_dir(SUBJECTS[name].ref)


def checkpoint_dir(name=MODEL.name):
    return f"{model_dir(name)}/checkpoint"


# The disk-lean GGUF routes delete the download once everything that reads it has run (docs/planner.md).
DROP_DOWNLOAD = not PLAN.gguf_route.keeps_download


def checkpoint_output():
    path = directory("results/models/{model}/{revision}/checkpoint")
    return temp(path) if DROP_DOWNLOAD else path


def kept_checkpoint(name=MODEL.name):
    """The checkpoint as a final target, unless the plan's route deletes it."""
    return [] if DROP_DOWNLOAD else [checkpoint_dir(name)]


def gguf_base_dir(wildcards):
    """The base GGUF the model's types are made from: its plan's route decides 16-bit or Q8_0."""
    return f"{wildcard_model_dir(wildcards)}/gguf/{subject(wildcards).plan.gguf_route.base}"


def calibration_dir(name=MODEL.name):
    return f"{model_dir(name)}/calibration"


def reference_dir(name=MODEL.name):
    return f"{model_dir(name)}/reference"


def wildcard_model_dir(wildcards):
    return f"results/models/{wildcards.model}/{wildcards.revision}"


def download_inputs(wildcards):
    """A local source's files, so that changing one reruns the download and what follows."""
    local = DOWNLOADS[wildcards.model].local_path
    return {"source_files": registry.local_source_files(local)} if local else {}


def download_source(wildcards):
    return DOWNLOADS[wildcards.model].location


def download_revision(wildcards):
    return DOWNLOADS[wildcards.model].revision


def calibration_inputs(wildcards):
    """The calibration text: the corpus split by default, else the configured file."""
    if SETTINGS.calibration.source == "corpus":
        return {"source": f"{CORPUS_DIR}/calibration.txt"}
    if CALIBRATION_FILE is not None:
        return {"source": CALIBRATION_FILE}
    return {}


def calibration_source_option(wildcards, input):
    return f"--source-file {input.source}" if "source" in input.keys() else ""


def manifest_parent(wildcards, output):
    """The artifact directory of a rule whose outputs are the files in it."""
    return str(Path(output.manifest).parent)


def stage_settings(section):
    """A config section as the JSON a stage command takes with --settings. A section's `formats` list is
    the plan's menu, not how one artifact is made: left out, so adding a format reruns nothing built.
    """
    return getattr(SETTINGS, section).model_dump_json(exclude={"formats"})


def task_settings():
    """The validate settings the 16-bit model's task scores depend on, as the JSON `deepcast reference --tasks`
    takes: the gate's thresholds are left out, so changing them reruns no reference."""
    return SETTINGS.validation.model_dump_json(include=lm_eval_tasks.FIELDS)


def task_data_files():
    return [str(path) for path in SETTINGS.validation.task_data.values()]


def gguf_variants(name=MODEL.name):
    """Quant ids the plan builds for the target: the type, suffixed when made without the imatrix,
    plus the configured no-imatrix controls of the chosen types."""
    chosen = [fmt for fmt, candidate in SUBJECTS[name].chosen.items() if candidate.kind == "gguf"]
    variants = [
        qtype + ("" if qtype in SIXTEEN_BIT or SETTINGS.gguf.imatrix else NO_IMATRIX)
        for qtype in chosen
    ]
    controls = [t.upper() for t in SETTINGS.gguf.controls if t.upper() in chosen]
    return list(dict.fromkeys(variants + [qtype + NO_IMATRIX for qtype in controls]))


def gguf_outputs(name=MODEL.name):
    return [f"{target_dir(name)}/llama.cpp/{quant}/validation" for quant in gguf_variants(name)]


def gguf_quant_type(wildcards):
    return wildcards.quant.removesuffix(NO_IMATRIX)


def gguf_artifact_dir(quant, name=MODEL.name):
    """The GGUF a bundle of `quant` deploys: a quantized one, or the 16-bit conversion itself."""
    qtype = quant.removesuffix(NO_IMATRIX)
    return f"{model_dir(name)}/gguf/{SIXTEEN_BIT.get(qtype, quant)}"


def gguf_artifact(wildcards):
    return gguf_artifact_dir(wildcards.quant, wildcards.model)


def gguf_quantize_inputs(wildcards):
    folder = wildcard_model_dir(wildcards)
    inputs = {"base": gguf_base_dir(wildcards)}
    if not wildcards.quant.endswith(NO_IMATRIX):
        inputs["imatrix"] = f"{folder}/gguf/imatrix"
    if not subject(wildcards).plan.gguf_route.keeps_download:
        # After the download's last reader, so that its deletion comes before any quantized file is written.
        inputs["reference"] = f"{folder}/reference"
    return inputs


def gguf_quantize_options(wildcards, input):
    options = [f"--imatrix {input.imatrix}"] if "imatrix" in input.keys() else []
    overrides = SETTINGS.gguf.tensor_types.get(gguf_quant_type(wildcards), [])
    options += [f"--tensor-type '{override}'" for override in overrides]
    return " ".join(options)


def gguf_candidate(wildcards):
    """The plan's chosen candidate of a GGUF job's quant type."""
    return subject(wildcards).chosen[gguf_quant_type(wildcards)]


def gguf_planned_flags(wildcards):
    """llama-server flags the plan expects from the predicted GGUF size."""
    return " ".join(gguf_candidate(wildcards).flags)


def compress_schemes(name=MODEL.name):
    """The compress schemes the plan builds, plus the configured controls wherever a scheme is built."""
    chosen = [fmt for fmt, c in SUBJECTS[name].chosen.items() if c.kind == "compressed"]
    return list(dict.fromkeys(chosen + (SETTINGS.compress.controls if chosen else [])))


def compress_engine(wildcards):
    """The engine the plan serves a scheme with on this target (a control borrows its scheme's)."""
    planned = subject(wildcards)
    candidate = planned.chosen.get(wildcards.scheme) or next(
        c for c in planned.plan.viable if c.format == wildcards.scheme
    )
    return candidate.engine


def compress_outputs(name=MODEL.name):
    return [f"{target_dir(name)}/vllm/{scheme}/validation" for scheme in compress_schemes(name)]


def chosen_formats(kind, name=MODEL.name):
    """The formats of one kind (trtllm, onnx, edgellm) the plan builds for this model."""
    return [fmt for fmt, c in SUBJECTS[name].chosen.items() if c.kind == kind]


def trtllm_outputs(name=MODEL.name):
    return [
        f"{target_dir(name)}/tensorrt-llm/{fmt}/validation"
        for fmt in chosen_formats("trtllm", name)
    ]


def trtllm_artifact(wildcards):
    """What a TensorRT-LLM bundle deploys: the ModelOpt checkpoint, or for trtllm-bf16 the download itself."""
    folder = wildcard_model_dir(wildcards)
    if wildcards.trtllm_format == "trtllm-bf16":
        return f"{folder}/checkpoint"
    return f"{folder}/trtllm/{wildcards.trtllm_format}"


def onnx_outputs(name=MODEL.name):
    return [
        f"{target_dir(name)}/onnxruntime-genai/{fmt}/validation"
        for fmt in chosen_formats("onnx", name)
    ]


def onnx_artifact(wildcards):
    """The graph built for the target's execution provider."""
    return f"{wildcard_model_dir(wildcards)}/onnx/{wildcards.onnx_format}-{provider_for(TARGET)}"


def edgellm_outputs(name=MODEL.name):
    return [
        f"{target_dir(name)}/tensorrt-edge-llm/{fmt}/validation"
        for fmt in chosen_formats("edgellm", name)
    ]


def engine_outputs(name=MODEL.name):
    """Every validation of the TensorRT-LLM, ONNX Runtime GenAI and TensorRT Edge-LLM branches."""
    return trtllm_outputs(name) + onnx_outputs(name) + edgellm_outputs(name)


def engine_shared_outputs(name=MODEL.name):
    """The target-independent artifacts of those branches."""
    folder = model_dir(name)
    outputs = [
        f"{folder}/trtllm/{fmt}" for fmt in chosen_formats("trtllm", name) if fmt != "trtllm-bf16"
    ]
    outputs += [
        f"{folder}/onnx/{fmt}-{provider_for(TARGET)}" for fmt in chosen_formats("onnx", name)
    ]
    return outputs + [f"{folder}/edgellm/{fmt}" for fmt in chosen_formats("edgellm", name)]


def plan_notes():
    """Print what the plan dropped from the menu and why, once per run."""
    for note in PLAN.notes:
        logger.warning(f"deepcast plan: {note}")


def plan_inputs(wildcards):
    """What the plan reads: the target profile, the compatibility rules, and the model's shape."""
    inputs = {
        "target": f"{CONFIG_DIR}/targets/{TARGET.name}.yaml",
        "rules": f"{CONFIG_DIR}/compatibility.yaml",
    }
    entry = subject(wildcards).ref.entry
    if entry is not None:
        inputs["model"] = f"{CONFIG_DIR}/models/{entry.name}.yaml"
    else:
        inputs["checkpoint"] = f"{wildcard_model_dir(wildcards)}/checkpoint"
    return inputs


def plan_model(wildcards, input):
    """The plan's --model: the configured model, or a student's own checkpoint directory."""
    return SETTINGS.model if subject(wildcards).student is None else input.checkpoint


def plan_options(wildcards, input):
    options = [f"--shape-from {input.checkpoint}"] if "checkpoint" in input.keys() else []
    if subject(wildcards).student is not None:
        options.append(f"--name {wildcards.model}")
    menu, explicit = SETTINGS.menu()
    options.append(f"{'--formats' if explicit else '--menu'} {','.join(menu)}")
    options += [f"--{key} {value}" for key, value in SETTINGS.preferences().items()]
    return " ".join(options)


def target_dir(name=MODEL.name):
    return layout.target_dir(TARGET.name, SUBJECTS[name].ref)


def plan_file(name=MODEL.name):
    return f"{target_dir(name)}/plan.json"


plan_notes()


def compress_recipe(wildcards):
    return SETTINGS.compress.recipes.get(
        wildcards.scheme, f"{CONFIG_DIR}/recipes/{wildcards.scheme}.yaml"
    )


def report_inputs(wildcards):
    """Everything the summary reads: the plan, the reference, every validation the plan asked for."""
    name = wildcards.model
    return {
        "plan": plan_file(name),
        "reference": reference_dir(name),
        "validations": gguf_outputs(name) + compress_outputs(name) + engine_outputs(name),
    }


def summary_outputs():
    return [f"{target_dir(name)}/summary/table.html" for name in SUBJECTS]


def all_outputs(name):
    """What `all` builds for one model: its plan, shared work, validations and summary."""
    return [
        plan_file(name),
        checkpoint_dir(name),
        calibration_dir(name),
        reference_dir(name),
        *gguf_outputs(name),
        *compress_outputs(name),
        *engine_outputs(name),
    ]


def shared_outputs():
    """The target-independent artifacts this target's plans need (computed once, cached across runs)."""
    outputs = []
    for name in SUBJECTS:
        outputs += kept_checkpoint(name) + [calibration_dir(name), reference_dir(name)]
        outputs += [gguf_artifact_dir(quant, name) for quant in gguf_variants(name)]
        if gguf_variants(name):
            outputs.append(f"{model_dir(name)}/gguf/kld-base")
        outputs += [f"{model_dir(name)}/compressed/{scheme}" for scheme in compress_schemes(name)]
        outputs += engine_shared_outputs(name)
    return outputs


# A distilled student's validations also score it against its teacher on the same tokens.
def teacher_kld_inputs(wildcards):
    """A student's GGUF validation also scores it against the teacher's saved 16-bit logits."""
    if subject(wildcards).student is None:
        return {}
    return {"teacher_kld_base": f"{model_dir()}/gguf/kld-base"}


def teacher_kld_option(wildcards, input):
    present = "teacher_kld_base" in input.keys()
    return f"--teacher-kld-base {input.teacher_kld_base}" if present else ""


def teacher_checkpoint_inputs(wildcards):
    """A student's compressed validation also compares it with the teacher on the same tokens."""
    return {} if subject(wildcards).student is None else {"teacher_checkpoint": checkpoint_dir()}


def teacher_checkpoint_option(wildcards, input):
    present = "teacher_checkpoint" in input.keys()
    return f"--teacher-checkpoint {input.teacher_checkpoint}" if present else ""


# Distillation (rules/distill.smk): the teacher's data, each student's inputs, what `all` adds.
def distill_source(wildcards):
    """The distillation text: the corpus train split by default, else the configured file."""
    source = SETTINGS.distill.source
    return f"{CORPUS_DIR}/train.txt" if source == "corpus" else source


def signal_inputs(wildcards):
    inputs = {"teacher": checkpoint_dir(), "source": distill_source(wildcards)}
    if distillation.signal_producer(SETTINGS.distill, PLAN.model.parameters) == "llama.cpp":
        inputs["gguf"] = gguf_artifact_dir(gguf_variants()[-1])  # the smallest GGUF the plan builds
    return inputs


def signal_options(wildcards, input):
    return f"--gguf {input.gguf}" if "gguf" in input.keys() else ""


def sequences_inputs(wildcards):
    inputs = {"teacher": checkpoint_dir(), "source": distill_source(wildcards)}
    producer = SETTINGS.distill.sequences.producer
    if producer == "bundle" or (producer == "auto" and gguf_variants()):
        inputs["bundle"] = f"{target_dir()}/llama.cpp/{gguf_variants()[0]}/bundle"
    return inputs


def sequences_options(wildcards, input):
    return f"--bundle {input.bundle}" if "bundle" in input.keys() else ""


def train_inputs(wildcards):
    student = subject(wildcards)
    data = "signal" if student.method == "logits" else "sequences"
    inputs = {"teacher": checkpoint_dir(), "data": f"{model_dir()}/distill/{data}"}
    if student.base is not None:
        inputs["base"] = f"{layout.model_dir(student.base)}/checkpoint"
    return inputs


def train_options(wildcards, input):
    student = subject(wildcards)
    options = [f"--student {student.student.name}", f"--alpha {student.alpha}"]
    return " ".join(options + ([f"--base {input.base}"] if "base" in input.keys() else []))


def signal_settings(wildcards):
    return distillation.teacher_data_settings(SETTINGS.distill, distillation.SIGNAL_FIELDS)


def sequences_settings(wildcards):
    return distillation.teacher_data_settings(SETTINGS.distill, distillation.SEQUENCE_FIELDS)


def student_settings(wildcards):
    return distillation.student_settings(SETTINGS.distill, subject(wildcards).student)


def student_outputs():
    """Each student's and control's own artifacts, their comparison with the teacher, and the summary."""
    if not STUDENTS:
        return []
    outputs = [f"{model_dir()}/distill/summary/students.html"]
    for name in STUDENTS:
        outputs += all_outputs(name) + [f"{model_dir(name)}/distillation"]
    return outputs


def distill_evaluations(wildcards):
    return [f"{model_dir(name)}/distillation" for name in STUDENTS]


def evaluation_options(wildcards, input):
    return " ".join(f"--evaluation {evaluation}" for evaluation in input.evaluations)
