# Configuration, the chosen model and target, and the path helpers every rule uses.
# The logic lives in the deepcast package; this file only calls it.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from deepcast import config as deepcast_config
from deepcast import fingerprint
from deepcast import registry
from deepcast.corpus import SHAKESPEARE
from deepcast.errors import DeepcastError

try:
    SETTINGS = deepcast_config.load(config)
    TARGET = registry.load_target(Path(workflow.basedir) / "config", SETTINGS.target)
    MODEL = registry.resolve_model(
        Path(workflow.basedir) / "config", SETTINGS.model, Path(workflow.basedir)
    )
    CALIBRATION_FILE = deepcast_config.calibration_source_file(SETTINGS.calibration)
except DeepcastError as error:
    raise WorkflowError(f"deepcast: {error}") from None

# --config passes nested values as strings ("8"); the typed settings have coerced them,
# so the config every rule sees is the validated, typed one.
config.update(SETTINGS.model_dump())
validate(config, "../workflow/schemas/config.schema.json")

CORPUS_DIR = f"results/corpus/{SHAKESPEARE.name}"


wildcard_constraints:
    model=MODEL.name,
    revision=MODEL.path_revision,


def model_dir():
    return f"results/models/{MODEL.name}/{MODEL.path_revision}"


def checkpoint_dir():
    return f"{model_dir()}/checkpoint"


def calibration_dir():
    return f"{model_dir()}/calibration"


def reference_dir():
    return f"{model_dir()}/reference"


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
