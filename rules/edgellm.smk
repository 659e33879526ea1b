# TensorRT Edge-LLM for Jetson targets: the ONNX export (quantized first for INT4/INT8) shared per model
# revision, made by the pinned exporter's own environment; per target a bundle that builds the engine on
# the device, and the checks that can run off it.


rule edgellm_export:
    input:
        checkpoint="results/models/{model}/{revision}/checkpoint",
        calibration="results/models/{model}/{revision}/calibration",
    output:
        export=directory("results/models/{model}/{revision}/edgellm/{edgellm_format}"),
    log:
        "logs/{model}/{revision}/edgellm_export_{edgellm_format}.log",
    cache: "omit-software"
    conda:
        "../envs/edgellm.yaml"
    threads: ALL_CORES
    resources:
        mem_mb=host_memory(cpu=5, gpu=5),
    params:
        code=fingerprint.of_stage("edgellm"),
    shell:
        "deepcast edgellm export --checkpoint {input.checkpoint} --calibration {input.calibration}"
        " --format {wildcards.edgellm_format} --out {output.export} > {log} 2>&1"


rule edgellm_bundle:
    input:
        export="results/models/{model}/{revision}/edgellm/{edgellm_format}",
    output:
        bundle=directory(
            "results/targets/{target}/{model}/{revision}/tensorrt-edge-llm/{edgellm_format}/bundle"
        ),
    log:
        "logs/{target}/{model}/{revision}/edgellm_bundle_{edgellm_format}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/edgellm_bundle_{edgellm_format}.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        config_dir=CONFIG_DIR,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("edgellm"),
    shell:
        "deepcast edgellm bundle --artifact {input.export} --format {wildcards.edgellm_format}"
        " --target {wildcards.target} --config-dir {params.config_dir} --out {output.bundle} > {log} 2>&1"


rule edgellm_validate:
    input:
        bundle="results/targets/{target}/{model}/{revision}/tensorrt-edge-llm/{edgellm_format}/bundle",
    output:
        validation=directory(
            "results/targets/{target}/{model}/{revision}/tensorrt-edge-llm/{edgellm_format}/validation"
        ),
    log:
        "logs/{target}/{model}/{revision}/edgellm_validate_{edgellm_format}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/edgellm_validate_{edgellm_format}.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        code=fingerprint.of_stage("edgellm"),
    shell:
        "deepcast edgellm validate --bundle {input.bundle} --format {wildcards.edgellm_format}"
        " --out {output.validation} > {log} 2>&1"
