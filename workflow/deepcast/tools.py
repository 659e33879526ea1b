"""llama.cpp at one pinned version: converter, gguf-py and the C++ tools from one source tree.

The source is the llama-cpp-python sdist (pinned by version and sha256), which
vendors the whole llama.cpp tree. `deepcast tools install llama.cpp` builds the
needed tools with cmake into a per-version, per-backend cache directory outside
the repository and never rebuilds what is cached. Users with their own build
point `tools.llama_cpp` (or DEEPCAST_LLAMA_CPP) at a directory holding `bin/`
and the source tree (`convert_hf_to_gguf.py`, `gguf-py/`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from deepcast import sdist as pinned_sdist
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path, cache_root, sha256_file

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = f"llama_cpp_python-{VERSION}/vendor/llama.cpp"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server", "llama-gguf-split")
STAMP = "build.json"
ENV_OVERRIDE = "DEEPCAST_LLAMA_CPP"


def own_environment(venv: Path, packages: list[str], log=print, remove: list[str] = ()) -> Path:
    """A tool's own virtual environment in the cache, for a tool whose pins conflict with deepcast's. A venv's
    scripts name their interpreter by path, so it is built in place and marked complete by a stamp; torch goes
    first and alone, so its pin takes the CPU build on disk where one exists. `remove`: what the packages pull in
    that breaks the environment and the tool never imports."""
    stamp = venv / "installed.json"
    if stamp.is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # an interrupted install
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    log(f"installing {', '.join(packages)} into {venv}")
    torch = [p for p in packages if p.startswith("torch==")]
    if torch:
        subprocess.run([*pip, *torch], check=True)
    subprocess.run([*pip, *(p for p in packages if p not in torch)], check=True)
    if remove:
        python = str(venv / "bin" / "python")
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", *remove], check=True)
    stamp.write_text(json.dumps({"packages": packages, "removed": list(remove)}) + "\n")
    return venv


def environment_tool(venv: Path, name: str, install_command: str) -> Path:
    """A console script of an environment `own_environment` completed, or the message that says how to get it."""
    path = venv / "bin" / name
    if not (venv / "installed.json").is_file() or not path.is_file():
        raise DeepcastError(f"{path} is missing: its environment is not installed. Fix: `{install_command}` "
                            "(make tools does it).")  # fmt: skip
    return path


def visible_gpus(field: str) -> list[str]:
    """One `nvidia-smi --query-gpu` field per visible GPU (name, compute_cap, ...); [] without a GPU."""
    if not shutil.which("nvidia-smi"):
        return []
    query = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                           text=True)  # fmt: skip
    return [line.strip() for line in query.stdout.splitlines() if line.strip()] if query.returncode == 0 else []


def cuda_architectures() -> str | None:
    """The visible GPUs' architectures (e.g. "75;89") when nvcc and a GPU exist, else None (CPU build)."""
    if not shutil.which("nvcc"):
        return None
    caps = sorted({cap.replace(".", "") for cap in visible_gpus("compute_cap")})
    return ";".join(caps) or None


def backend_name(cuda_archs: str | None) -> str:
    return f"cuda-{cuda_archs.replace(';', '-')}" if cuda_archs else "cpu"


@dataclass(frozen=True)
class LlamaCpp:
    """A located llama.cpp: its tools, its converter and what it was built from."""

    root: Path
    stamp: dict

    def tool(self, name: str) -> Path:
        path = self.root / "bin" / name
        if not path.is_file():
            raise DeepcastError(
                f"llama.cpp tool {name} is missing from {self.root / 'bin'}. "
                "Fix: run `deepcast tools install llama.cpp --force`, or point tools.llama_cpp at a full build."
            )
        return path

    @property
    def converter(self) -> Path:
        return self.root / "src" / "convert_hf_to_gguf.py"

    def converter_env(self) -> dict[str, str]:
        """The converter imports gguf-py from its own tree, never a different installed gguf."""
        paths = [str(self.root / "src" / "gguf-py"), str(self.root / "src")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}

    @property
    def compute_backend(self) -> str:
        """Where the tools compute here: "cuda" for a CUDA build with a GPU visible (every layer that fits is
        offloaded by default), else "cpu"."""
        return "cuda" if str(self.stamp.get("backend", "")).startswith("cuda") and visible_gpus("name") else "cpu"

    def versions(self) -> dict:
        return {k: self.stamp[k] for k in ("version", "sdist_sha256", "backend", "cmake_flags") if k in self.stamp}


def install_dir(cuda_archs: str | None) -> Path:
    return cache_root() / "llama.cpp" / f"{VERSION}-{backend_name(cuda_archs)}"


def locate(configured: str | None = None) -> LlamaCpp:
    """The configured llama.cpp, or the cached build of the pinned version for this machine."""
    explicit = configured or os.environ.get(ENV_OVERRIDE)
    root = Path(explicit).expanduser() if explicit else install_dir(cuda_architectures())
    stamp_path = root / STAMP
    if not stamp_path.is_file():
        if explicit:
            return LlamaCpp(root, {"version": "user-provided", "backend": "unknown"})
        raise DeepcastError(
            f"llama.cpp {VERSION} is not built for this machine ({root} has no {STAMP}). "
            "Fix: run `deepcast tools install llama.cpp` (make install does it)."
        )
    stamp = json.loads(stamp_path.read_text())
    expected = {"version": VERSION, "backend": backend_name(cuda_architectures())}
    if not explicit and any(stamp.get(k) != v for k, v in expected.items()):
        raise DeepcastError(
            f"{root} was built for {stamp.get('version')}/{stamp.get('backend')}, not "
            f"{expected['version']}/{expected['backend']}. Fix: run `deepcast tools install llama.cpp --force`."
        )
    return LlamaCpp(root, stamp)


# What neither the build of TOOLS nor the converter reads: `deepcast tools pack llama.cpp` leaves it out, so the
# source fits where the full sdist (77 MB, mostly test vocabularies and docs) cannot travel.
UNNEEDED = (
    "docs", "models", "media", "tests", "benches", "examples", "pocs", "ci", "skills", "grammars",
    "tools/ui/src", "tools/ui/tests", "tools/server/tests",
    *(f"ggml/src/ggml-{backend}" for backend in
      ("cann", "et", "hexagon", "metal", "musa", "opencl", "openvino", "sycl", "virtgpu", "vulkan", "webgpu", "zdnn")),
)  # fmt: skip
PACKED = "deepcast-source.json"  # what a packed tree was cut from


def _unneeded(name: str) -> bool:
    return any(name == path or name.startswith(path + "/") for path in UNNEEDED)


def _sdist() -> Path:
    return pinned_sdist.fetch(
        PACKAGE, VERSION, SDIST_SHA256, cache_root() / "downloads" / f"llama_cpp_python-{VERSION}.tar.gz"
    )


def pack(out: Path, log=print) -> dict:
    """The pinned tree without what the build and converter never read, as a .tar.xz for an offline machine."""
    sdist = _sdist()
    record = {"package": PACKAGE, "version": VERSION, "sdist_sha256": SDIST_SHA256, "left_out": list(UNNEEDED)}
    with atomic_path(out) as tmp, tarfile.open(sdist) as archive, tarfile.open(tmp, "w:xz") as packed:
        for member in archive.getmembers():
            name = member.name[len(VENDORED) + 1 :]
            if member.name.startswith(VENDORED + "/") and not _unneeded(name):
                member.name = name
                member.pax_headers.pop("path", None)  # a long name's pax record would otherwise win over .name
                packed.addfile(member, archive.extractfile(member) if member.isfile() else None)
        data = (json.dumps(record, indent=2) + "\n").encode()
        info = tarfile.TarInfo(PACKED)
        info.size = len(data)
        packed.addfile(info, io.BytesIO(data))
    log(f"packed llama.cpp {VERSION} into {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return record


def extract(source: Path | None, dest: Path) -> dict:
    """The pinned sdist's vendored tree, or a packed one (checked to be cut from that sdist), into dest."""
    if source is None:
        with tarfile.open(_sdist()) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(VENDORED + "/")]
            for member in members:
                member.name = member.name[len(VENDORED) + 1 :]
            archive.extractall(dest, members=members, filter="data")
        return {"sdist_sha256": SDIST_SHA256}
    try:
        with tarfile.open(source) as archive:
            archive.extractall(dest, filter="data")
        record = json.loads((dest / PACKED).read_text())
    except (OSError, tarfile.TarError, json.JSONDecodeError) as error:
        raise DeepcastError(
            f"{source} is not a llama.cpp source packed by deepcast ({' '.join(str(error).split())}). "
            "Fix: make it with `deepcast tools pack llama.cpp OUT.tar.xz` on a machine that reaches the registry."
        ) from None
    if (record.get("version"), record.get("sdist_sha256")) != (VERSION, SDIST_SHA256):
        raise DeepcastError(
            f"{source} was packed from {record.get('package')} {record.get('version')}, not the pinned {VERSION}. "
            "Fix: pack it again with this deepcast (`deepcast tools pack llama.cpp OUT.tar.xz`)."
        )
    return {"sdist_sha256": SDIST_SHA256, "packed_source_sha256": sha256_file(source)}


def cmake_flags(cuda_archs: str | None) -> list[str]:
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        f"-DGGML_CUDA={'ON' if cuda_archs else 'OFF'}",
        *([f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}"] if cuda_archs else []),
    ]


def install(force: bool = False, jobs: int | None = None, log=print, source: Path | None = None) -> LlamaCpp:
    """Build TOOLS from the pinned sdist, or from a tree `pack` cut from it (`source`), into the cache."""
    cuda_archs = cuda_architectures()
    root = install_dir(cuda_archs)
    if (root / STAMP).is_file() and not force:
        log(f"llama.cpp {VERSION} ({backend_name(cuda_archs)}) already built in {root}")
        return locate()
    flags = cmake_flags(cuda_archs)
    with atomic_path(root) as tmp:
        tmp.mkdir(parents=True)
        log(f"extracting llama.cpp {VERSION} from {source or 'the pinned sdist'}")
        provenance = extract(source, tmp / "src")
        build = tmp / "build"
        _run(["cmake", "-S", str(tmp / "src"), "-B", str(build), *flags], log)
        _run(["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS], log)
        (tmp / "bin").mkdir()
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, tmp / "bin" / tool)
        shutil.rmtree(build)
        stamp = {
            "package": PACKAGE,
            "version": VERSION,
            **provenance,
            "backend": backend_name(cuda_archs),
            "cmake_flags": flags,
            "machine": platform.machine(),
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    log(f"llama.cpp {VERSION} built in {root}")
    return locate()


def _run(cmd: list[str], log) -> None:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise DeepcastError(f"`{' '.join(cmd[:3])} ...` failed (exit {result.returncode}); see the output above.")
