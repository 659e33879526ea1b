# Calibration set: one file of N samples x L tokens, shared by every quantizer and the imatrix.


rule calibrate:
    input:
        unpack(calibration_inputs),
        checkpoint="results/models/{model}/{revision}/checkpoint",
    output:
        calibration=directory("results/models/{model}/{revision}/calibration"),
    log:
        "logs/{model}/{revision}/calibrate.log",
    benchmark:
        "benchmarks/{model}/{revision}/calibrate.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        source_option=calibration_source_option,
        settings=stage_settings("calibration"),
        code=fingerprint.of_stage("calibrate"),
    shell:
        "deepcast calibrate --checkpoint {input.checkpoint} {params.source_option}"
        " --out {output.calibration} --settings {params.settings:q} > {log} 2>&1"
