# TensorRT-LLM: ModelOpt checkpoints shared per model revision (no engine build: trtllm-serve's PyTorch
# backend loads them and tunes its kernels at start on the target GPU), and per target a bundle with the
# plan's serve configuration and its validation.


rule trtllm_quantize:
    input:
        checkpoint="results/models/{model}/{revision}/checkpoint",
        calibration="results/models/{model}/{revision}/calibration",
        reference="results/models/{model}/{revision}/reference",
    output:
        checkpoint=directory("results/models/{model}/{revision}/trtllm/{trtllm_format}"),
    log:
        "logs/{model}/{revision}/trtllm_quantize_{trtllm_format}.log",
    # Shared by every target and cached across checkouts; time and peak GPU memory are in its manifest.
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=5, gpu=2),
    params:
        settings=stage_settings("trtllm"),
        evaluation=stage_settings("evaluation"),
        code=fingerprint.of_stage("trtllm"),
    shell:
        "deepcast trtllm quantize --checkpoint {input.checkpoint} --calibration {input.calibration}"
        " --reference {input.reference} --format {wildcards.trtllm_format} --settings {params.settings:q}"
        " --evaluation {params.evaluation:q} --out {output.checkpoint} > {log} 2>&1"


rule trtllm_bundle:
    input:
        artifact=trtllm_artifact,
    output:
        bundle=directory(
            "results/targets/{target}/{model}/{revision}/tensorrt-llm/{trtllm_format}/bundle"
        ),
    log:
        "logs/{target}/{model}/{revision}/trtllm_bundle_{trtllm_format}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/trtllm_bundle_{trtllm_format}.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        settings=stage_settings("trtllm"),
        config_dir=CONFIG_DIR,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("trtllm"),
    shell:
        "deepcast trtllm bundle --artifact {input.artifact} --format {wildcards.trtllm_format}"
        " --target {wildcards.target} --config-dir {params.config_dir} --settings {params.settings:q}"
        " --out {output.bundle} > {log} 2>&1"


rule trtllm_validate:
    input:
        unpack(teacher_checkpoint_inputs),
        bundle="results/targets/{target}/{model}/{revision}/tensorrt-llm/{trtllm_format}/bundle",
        checkpoint="results/models/{model}/{revision}/checkpoint",
        reference="results/models/{model}/{revision}/reference",
        plan="results/targets/{target}/{model}/{revision}/plan.json",
    output:
        validation=directory(
            "results/targets/{target}/{model}/{revision}/tensorrt-llm/{trtllm_format}/validation"
        ),
    log:
        "logs/{target}/{model}/{revision}/trtllm_validate_{trtllm_format}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/trtllm_validate_{trtllm_format}.tsv"
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        gpu=trtllm_validate_gpus,
        mem_mb=host_memory(cpu=4, gpu=2),
    params:
        settings=stage_settings("evaluation"),
        gates=stage_settings("validation"),
        config_dir=CONFIG_DIR,
        teacher=teacher_checkpoint_option,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("trtllm"),
    shell:
        "deepcast trtllm validate --bundle {input.bundle} --checkpoint {input.checkpoint} {params.teacher}"
        " --reference {input.reference} --format {wildcards.trtllm_format}"
        " --settings {params.settings:q} --gates {params.gates:q}"
        " --target {wildcards.target} --config-dir {params.config_dir} --plan {input.plan}"
        " --out {output.validation} > {log} 2>&1"
