# Configuration, the chosen model and target, and the path helpers every rule uses.
# The logic lives in the deepcast package; this file only calls it.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from deepcast import config as deepcast_config
from deepcast import fingerprint
from deepcast import layout
from deepcast.stages import plan as planning
from deepcast import registry
from deepcast.corpus import SHAKESPEARE
from deepcast.errors import DeepcastError
from deepcast.stages.compress import SCHEMES as COMPRESS_SCHEMES
from deepcast.stages.gguf import SIXTEEN_BIT

CONFIG_DIR = str(Path(workflow.basedir) / "config")

try:
    SETTINGS = deepcast_config.load(config)
    TARGET = registry.load_target(Path(CONFIG_DIR), SETTINGS.target)
    MODEL = registry.resolve_model(Path(CONFIG_DIR), SETTINGS.model, Path(workflow.basedir))
    CALIBRATION_FILE = deepcast_config.calibration_source_file(SETTINGS.calibration)
    PLAN = planning.plan_for(
        planning.plan_model(MODEL, Path(layout.model_dir(MODEL)) / "checkpoint"),
        TARGET,
        Path(CONFIG_DIR),
        *SETTINGS.menu(),
    )
    CHOSEN = {candidate.format: candidate for candidate in PLAN.require_chosen()}
except DeepcastError as error:
    raise WorkflowError(f"deepcast: {error}") from None

# --config passes nested values as strings ("8"); the typed settings have coerced them,
# so the config every rule sees is the validated, typed one.
config.update(SETTINGS.model_dump(by_alias=True))
validate(config, "../workflow/schemas/config.schema.json")

CORPUS_DIR = f"results/corpus/{SHAKESPEARE.name}"
# A change to the target's profile reruns only the steps that read it.
TARGET_PROFILE_DIGEST = registry.target_digest(Path(CONFIG_DIR), TARGET.name)
LLAMA_CPP_OPTION = f"--llama-cpp {SETTINGS.tools.llama_cpp}" if SETTINGS.tools.llama_cpp else ""
NO_IMATRIX = "-noimat"


wildcard_constraints:
    model=MODEL.name,
    revision=MODEL.path_revision,
    target=TARGET.name,
    dtype="bf16|f16",
    quant="[A-Z0-9_]+(-noimat)?",
    scheme="|".join(COMPRESS_SCHEMES),


def model_dir():
    return layout.model_dir(MODEL)


def checkpoint_dir():
    return f"{model_dir()}/checkpoint"


def calibration_dir():
    return f"{model_dir()}/calibration"


def reference_dir():
    return f"{model_dir()}/reference"


def download_inputs(wildcards):
    """A local source's files, so that changing one reruns the download and what follows."""
    if MODEL.local_path is None:
        return {}
    return {"source_files": registry.local_source_files(MODEL.local_path)}


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
    """A config section as the JSON a stage command takes with --settings."""
    return getattr(SETTINGS, section).model_dump_json()


def gguf_variants():
    """Quant ids the plan builds for the target: the type, suffixed when made without the imatrix,
    plus the configured no-imatrix controls of the chosen types."""
    chosen = [fmt for fmt, candidate in CHOSEN.items() if candidate.kind == "gguf"]
    variants = [
        qtype + ("" if qtype in SIXTEEN_BIT or SETTINGS.gguf.imatrix else NO_IMATRIX)
        for qtype in chosen
    ]
    controls = [t.upper() for t in SETTINGS.gguf.controls if t.upper() in chosen]
    return list(dict.fromkeys(variants + [qtype + NO_IMATRIX for qtype in controls]))


def gguf_outputs():
    return [f"{target_dir()}/llama.cpp/{quant}/validation" for quant in gguf_variants()]


def gguf_quant_type(wildcards):
    return wildcards.quant.removesuffix(NO_IMATRIX)


def gguf_artifact_dir(quant):
    """The GGUF a bundle of `quant` deploys: a quantized one, or the 16-bit conversion itself."""
    qtype = quant.removesuffix(NO_IMATRIX)
    return f"{model_dir()}/gguf/{SIXTEEN_BIT.get(qtype, quant)}"


def gguf_artifact(wildcards):
    return gguf_artifact_dir(wildcards.quant)


def gguf_quantize_inputs(wildcards):
    inputs = {"base": f"{model_dir()}/gguf/bf16", "checkpoint": checkpoint_dir()}
    if not wildcards.quant.endswith(NO_IMATRIX):
        inputs["imatrix"] = f"{model_dir()}/gguf/imatrix"
    return inputs


def gguf_quantize_options(wildcards, input):
    options = [f"--imatrix {input.imatrix}"] if "imatrix" in input.keys() else []
    overrides = SETTINGS.gguf.tensor_types.get(gguf_quant_type(wildcards), [])
    options += [f"--tensor-type '{override}'" for override in overrides]
    return " ".join(options)


def gguf_planned_flags(wildcards):
    """llama-server flags the plan expects from the predicted GGUF size."""
    return " ".join(CHOSEN[gguf_quant_type(wildcards)].flags)


def compress_schemes():
    """The compress schemes the plan builds, plus the configured controls wherever a scheme is built."""
    chosen = [fmt for fmt, candidate in CHOSEN.items() if candidate.kind == "compressed"]
    return list(dict.fromkeys(chosen + (SETTINGS.compress.controls if chosen else [])))


def compress_engine(wildcards):
    """The engine the plan serves a scheme with on this target (a control borrows its scheme's)."""
    candidate = CHOSEN.get(wildcards.scheme) or next(
        c for c in PLAN.viable if c.format == wildcards.scheme
    )
    return candidate.engine


def compress_outputs():
    return [f"{target_dir()}/vllm/{scheme}/validation" for scheme in compress_schemes()]


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
    if MODEL.entry is not None:
        inputs["model"] = f"{CONFIG_DIR}/models/{MODEL.entry.name}.yaml"
    else:
        inputs["checkpoint"] = checkpoint_dir()
    return inputs


def plan_options(wildcards, input):
    options = [f"--shape-from {input.checkpoint}"] if "checkpoint" in input.keys() else []
    menu, explicit = SETTINGS.menu()
    options.append(f"{'--formats' if explicit else '--menu'} {','.join(menu)}")
    return " ".join(options)


def target_dir():
    return layout.target_dir(TARGET.name, MODEL)


def plan_file():
    return f"{target_dir()}/plan.json"


plan_notes()


def compress_recipe(wildcards):
    return SETTINGS.compress.recipes.get(
        wildcards.scheme, f"{CONFIG_DIR}/recipes/{wildcards.scheme}.yaml"
    )


def report_inputs(wildcards):
    """Everything the summary reads: the plan, the reference, every validation the plan asked for."""
    return {
        "plan": plan_file(),
        "reference": reference_dir(),
        "validations": gguf_outputs() + compress_outputs(),
    }


def summary_outputs():
    return [f"{target_dir()}/summary/table.html"]


def shared_outputs():
    """The target-independent artifacts this target's plan needs (computed once, cached across runs)."""
    outputs = [checkpoint_dir(), calibration_dir(), reference_dir()]
    outputs += [gguf_artifact_dir(quant) for quant in gguf_variants()]
    if gguf_variants():
        outputs.append(f"{model_dir()}/gguf/kld-base")
    return outputs + [f"{model_dir()}/compressed/{scheme}" for scheme in compress_schemes()]
