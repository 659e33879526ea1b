# deepcast: a DeepSeek checkpoint to validated, deployable artifacts for one hardware target.
#
#   snakemake --cores all --config target=4x2080ti model=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
#
# Shared work (download, corpus, calibration, reference) lives under results/models/<model>/<revision>/;
# work that depends on the target lives under results/targets/<target>/<model>/<revision>/.
from snakemake.utils import min_version

min_version("9.12")


# Relative to the Snakefile, so `snakemake --directory DIR` finds it from anywhere.
configfile: f"{workflow.basedir}/config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/plan.smk"
include: "rules/corpus.smk"
include: "rules/download.smk"
include: "rules/calibrate.smk"
include: "rules/reference.smk"
include: "rules/gguf.smk"
include: "rules/compress.smk"
include: "rules/trtllm.smk"
include: "rules/onnx.smk"
include: "rules/edgellm.smk"
include: "rules/distill.smk"
include: "rules/report.smk"


# Light jobs run where Snakemake runs, not as cluster jobs: planning, the corpus and the hub download
# (compute nodes often have no way out), the bundles (links, launch scripts, checksums) and the report.
localrules:
    all,
    shared,
    plan,
    corpus,
    download,
    gguf_bundle,
    vllm_bundle,
    trtllm_bundle,
    onnx_bundle,
    edgellm_bundle,
    distill_summary,
    report,


# Every artifact, the shared ones included: a shared artifact that went missing (a cancelled job, a deleted
# folder) is rebuilt even where the bundles made from it are up to date.
rule all:
    default_target: True
    input:
        plan=plan_file(),
        shared=shared_outputs(),
        gguf=gguf_outputs(),
        compressed=compress_outputs(),
        engines=engine_outputs(),
        students=student_outputs(),
        summary=summary_outputs(),


# The target-independent part of `all`: what `deepcast rebuild` builds under its machine-wide lock.
rule shared:
    input:
        shared=shared_outputs(),
