# Reference evaluation: the downloaded checkpoint's perplexity on the evaluation split and its lm-eval task
# scores, the baseline every quantized artifact is compared with.


rule reference:
    input:
        checkpoint="results/models/{model}/{revision}/checkpoint",
        evaluation_text=f"{CORPUS_DIR}/evaluation.txt",
        task_data=task_data_files(),
    output:
        reference=directory("results/models/{model}/{revision}/reference"),
    log:
        "logs/{model}/{revision}/reference.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=2, gpu=1),
    params:
        settings=stage_settings("evaluation"),
        tasks=task_settings(),
        code=fingerprint.of_stage("reference"),
    shell:
        "deepcast reference --checkpoint {input.checkpoint} --evaluation-text {input.evaluation_text}"
        " --out {output.reference} --settings {params.settings:q} --tasks {params.tasks:q} > {log} 2>&1"
