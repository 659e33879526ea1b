# Download: the checkpoint's safetensors, config and tokenizer, verified file by file,
# from the hub (revision resolved to a commit sha) or from a local directory.


rule download:
    input:
        unpack(download_inputs),
    output:
        checkpoint=checkpoint_output(),
    log:
        "logs/{model}/{revision}/download.log",
    # Students' checkpoints come from distill_train.
    wildcard_constraints:
        model=DOWNLOADED_MODELS,
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    params:
        source=download_source,
        revision=download_revision,
        settings=stage_settings("download"),
        code=fingerprint.of_stage("download"),
    shell:
        "deepcast download --source {params.source:q} --revision {params.revision:q}"
        " --out {output.checkpoint} --settings {params.settings:q} > {log} 2>&1"
