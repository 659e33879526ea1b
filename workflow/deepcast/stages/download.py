"""Download: a hub repo (hf://org/name@revision) or a local directory into a verified checkpoint.

Hub revisions are resolved to a commit sha first and every file is fetched at
that sha, so a branch that moves mid-download cannot mix two commits. Files
land in a stable staging folder beside the output: a rerun after an interrupted
download keeps every verified file and resumes a partial one with an HTTP Range
request. Each file is checked against the hub's sha256 (LFS) or git blob id.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deepcast import hub
from deepcast.config import DownloadSettings
from deepcast.errors import DeepcastError
from deepcast.files import disk_full, free_bytes, remove, sha256_file, short_of_space
from deepcast.manifest import Recorder

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CAUSAL_LM_TABLE = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"  # in transformers.models.auto.modeling_auto


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files
    git_oid: str | None = None  # plain git blobs


def _matches(path: str, patterns) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def select_files(available: list[str], settings: DownloadSettings) -> list[str]:
    """The files to fetch; refuse pickle-only checkpoints unless the user opted in."""
    chosen = [f for f in available if _matches(f, settings.allow_patterns)]
    if any(f.endswith(".safetensors") for f in chosen):
        return chosen
    pickles = [f for f in available if _matches(f, PICKLE_WEIGHTS) and not f.startswith("training_args")]
    if not pickles:
        raise DeepcastError(
            f"no weights found: none of {', '.join(available) or 'no files'} is a .safetensors file. "
            "Fix: point the model at a checkpoint that ships safetensors weights."
        )
    if not settings.allow_pickle:
        raise DeepcastError(
            f"this checkpoint has only pickle weights ({', '.join(pickles[:3])}); loading pickle can run "
            "arbitrary code. Fix: use a revision with safetensors weights, or opt in with "
            "--config download='{allow_pickle: true}' to load them with torch's weights_only loader "
            "and rewrite them as safetensors."
        )
    return chosen + pickles + [f for f in available if f == PICKLE_INDEX]


def causal_lm_classes() -> set[str]:
    """transformers' built-in causal-LM classes, read from its auto-mapping table's source: importing
    modeling_auto pulls in torch and the generation stack, 5 to 7 s on 2 cores, for a set of names."""
    import ast
    from importlib import metadata

    source = metadata.distribution("transformers").locate_file("transformers/models/auto/modeling_auto.py")
    for node in ast.parse(Path(source).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == CAUSAL_LM_TABLE for t in node.targets):
            return {name for _, name in ast.literal_eval(node.value.args[0])}
    from transformers.models.auto import modeling_auto  # the table is no longer a literal: ask the module

    return set(getattr(modeling_auto, CAUSAL_LM_TABLE).values())


def check_config(config_path: Path) -> dict:
    """Refuse checkpoints that need remote code or that transformers cannot build."""
    if not config_path.is_file():
        raise DeepcastError("the checkpoint has no config.json. Fix: point the model at a transformers checkpoint.")
    config = json.loads(config_path.read_text())
    if "auto_map" in config:
        raise DeepcastError(
            f"this checkpoint needs remote code (config.json has auto_map: {sorted(config['auto_map'])}); "
            "deepcast never runs code from a model repository. Fix: use a checkpoint whose architecture "
            "transformers ships natively, for example a revision converted to a built-in model type."
        )
    known = causal_lm_classes()
    unknown = [a for a in config.get("architectures", []) if a not in known]
    if unknown or not config.get("architectures"):
        raise DeepcastError(
            f"transformers has no built-in causal-LM class for {unknown or 'this checkpoint (no architectures)'}; "
            "running it would need remote code. Fix: upgrade transformers, or use a natively supported checkpoint."
        )
    return config


class HubSource:
    def __init__(self, hub_id: str, revision: str, settings: DownloadSettings):
        from huggingface_hub import HfApi

        self.hub_id, self.requested, self.settings = hub_id, revision, settings
        self.endpoint, self.token = hub.endpoint(), hub.token()
        self.api = HfApi(endpoint=self.endpoint, token=self.token)
        self.revision = revision

    def list_files(self) -> dict[str, RemoteFile]:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = self.api.model_info(self.hub_id, revision=self.requested, files_metadata=True)
        except GatedRepoError:
            raise DeepcastError(
                f"{self.hub_id} is gated. Fix: accept its licence on the hub and export HF_TOKEN."
            ) from None
        except RevisionNotFoundError:
            raise DeepcastError(
                f"revision {self.requested!r} does not exist in {self.hub_id}. Fix: use a branch, tag or "
                "commit sha that the repository has."
            ) from None
        except RepositoryNotFoundError:
            raise DeepcastError(
                f"model {self.hub_id} not found at {self.endpoint} (or it is private). "
                "Fix: check the id, or export HF_TOKEN for a private repository."
            ) from None
        except OSError as error:
            raise DeepcastError(
                f"cannot reach the model hub at {self.endpoint}: {error}. Fix: check the network or HF_ENDPOINT."
            ) from None
        self.revision = info.sha
        return {
            s.rfilename: RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id)
            for s in info.siblings
        }

    def fetch(self, remote: RemoteFile, dest: Path) -> None:
        """Stream one file to dest, resuming from dest.part with Range after a dropped connection."""
        import httpx
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        url = hf_hub_url(self.hub_id, remote.path, revision=self.revision, endpoint=self.endpoint)
        partial = dest.with_name(dest.name + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.settings.retries + 1):
            have = partial.stat().st_size if partial.exists() else 0
            headers = build_hf_headers(token=self.token)
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
                    if response.status_code == 416:  # already complete
                        break
                    response.raise_for_status()
                    mode = "ab" if response.status_code == 206 else "wb"
                    start = have if mode == "ab" else 0
                    with (
                        open(partial, mode) as handle,
                        tqdm(
                            total=remote.size, initial=start, unit="B", unit_scale=True, desc=remote.path, leave=False
                        ) as bar,
                    ):
                        for chunk in response.iter_bytes():
                            handle.write(chunk)
                            bar.update(len(chunk))
                if partial.stat().st_size >= remote.size:
                    break
            except (httpx.TransportError, httpx.RemoteProtocolError) as error:
                if attempt == self.settings.retries:
                    kept = partial.stat().st_size if partial.exists() else 0
                    raise DeepcastError(
                        f"download of {remote.path} was interrupted ({error}); {kept} bytes are kept. "
                        "Fix: rerun the same command to resume."
                    ) from None
            except httpx.HTTPStatusError as error:
                raise DeepcastError(f"the hub answered {error.response.status_code} for {remote.path}.") from None
        verify(remote, partial)
        os.replace(partial, dest)


class LocalSource:
    def __init__(self, path: str, revision: str):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DeepcastError(f"local model directory {self.root} does not exist. Fix: check the path.")
        self.revision = revision

    def list_files(self) -> dict[str, RemoteFile]:
        return {
            p.relative_to(self.root).as_posix(): RemoteFile(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }

    def fetch(self, remote: RemoteFile, dest: Path) -> None:
        partial = dest.with_name(dest.name + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / remote.path, partial)
        os.replace(partial, dest)


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(remote: RemoteFile, path: Path) -> None:
    """Compare a downloaded file with the hub's checksum; delete it on mismatch."""
    if remote.sha256:
        actual, expected, kind = sha256_file(path), remote.sha256, "sha256"
    elif remote.git_oid:
        actual, expected, kind = git_blob_sha1(path), remote.git_oid, "git blob id"
    else:
        return
    if actual != expected:
        path.unlink()
        raise DeepcastError(
            f"{remote.path} is corrupt: its {kind} is {actual}, the hub says {expected}. "
            "The damaged file was deleted. Fix: rerun to download it again."
        )


def convert_pickle_weights(directory: Path) -> list[str]:
    """Rewrite opted-in pickle weights as safetensors, loading them with weights_only=True."""
    import torch
    from safetensors.torch import save_file

    converted = []
    for path in sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt")) + sorted(directory.glob("*.pth")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        target = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={"format": "pt"})
        path.unlink()
        converted.append(path.name)
    index = directory / PICKLE_INDEX
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v.rsplit(".", 1)[0] + ".safetensors" for k, v in data["weight_map"].items()}
        (directory / "model.safetensors.index.json").write_text(json.dumps(data, indent=2))
        index.unlink()
    return converted


def run(source: str, revision: str, out: Path, settings: DownloadSettings) -> dict:
    if source.startswith("hf://"):
        hub_id = source.removeprefix("hf://").partition("@")[0]
        origin = HubSource(hub_id, revision, settings)
    else:
        origin = LocalSource(source, revision)
    recorder = Recorder("download", {"source": source, "revision": revision, **settings.model_dump()})
    listing = origin.list_files()
    wanted = select_files(sorted(listing), settings)
    if not any(_matches(f, TOKENIZER_FILES) for f in wanted):
        raise DeepcastError(
            f"{source} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); calibration and evaluation need one. "
            "Fix: use a checkpoint that ships its tokenizer (for the embedded model, run `make install`)."
        )

    staging = out.with_name(f".{out.name}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    missing = sum(listing[name].size for name in wanted if not (staging / name).exists())
    kept = f"What was fetched stays in {staging} for the rerun to resume."
    if missing > free_bytes(staging):
        raise DeepcastError(short_of_space(f"the download of {source}", staging, missing, kept, "the source's"))
    # config.json first: refuse remote code before fetching gigabytes of weights.
    ordered = sorted(wanted, key=lambda f: (f != "config.json", f))
    for name in tqdm(ordered, desc="files", unit="file"):
        dest = staging / name
        try:
            if not dest.exists():
                origin.fetch(listing[name], dest)
        except OSError as error:
            if not disk_full(error):
                raise
            message = short_of_space(f"the download of {source}", staging, missing, kept, "the source's")
            raise DeepcastError("the disk filled up: " + message) from None
        if name == "config.json":
            check_config(dest)
    if "config.json" not in wanted:
        check_config(staging / "config.json")
    converted = convert_pickle_weights(staging) if settings.allow_pickle else []

    recorder.results = {
        "source": source,
        "requested_revision": revision,
        "resolved_revision": origin.revision,
        "converted_from_pickle": converted,
    }
    recorder.write(staging)
    remove(out)
    os.replace(staging, out)
    return recorder.results
