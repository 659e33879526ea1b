# Calibration set: one file of N samples x L tokens, shared by every quantizer and the imatrix.


rule calibrate:
    input:
        unpack(calibration_inputs),
        checkpoint="results/models/{model}/{revision}/checkpoint",
    output:
        calibration=directory("results/models/{model}/{revision}/calibration"),
    log:
        "logs/{model}/{revision}/calibrate.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    params:
        source_option=calibration_source_option,
        settings=stage_settings("calibration"),
        code=fingerprint.of_stage("calibrate"),
    shell:
        "deepcast calibrate --checkpoint {input.checkpoint} {params.source_option}"
        " --out {output.calibration} --settings {params.settings:q} > {log} 2>&1"
