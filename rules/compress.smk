# llm-compressor schemes: compressed-tensors checkpoints shared per model revision, and per target
# a bundle for the engine the plan chose (vLLM on GPUs; vLLM's CPU backend or transformers on CPUs)
# and its validation.


rule compress:
    input:
        checkpoint="results/models/{model}/{revision}/checkpoint",
        calibration="results/models/{model}/{revision}/calibration",
        recipe=compress_recipe,
    output:
        compressed=directory("results/models/{model}/{revision}/compressed/{scheme}"),
    log:
        "logs/{model}/{revision}/compress_{scheme}.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/llm-compressor.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=1.5, gpu=1.5),
    params:
        scheme="{scheme}",
        code=fingerprint.of_stage("compress"),
    shell:
        "deepcast compress run --checkpoint {input.checkpoint} --calibration {input.calibration}"
        " --scheme {params.scheme} --recipe {input.recipe} --out {output.compressed} > {log} 2>&1"


rule vllm_bundle:
    input:
        compressed="results/models/{model}/{revision}/compressed/{scheme}",
    output:
        bundle=directory("results/targets/{target}/{model}/{revision}/vllm/{scheme}/bundle"),
    log:
        "logs/{target}/{model}/{revision}/vllm_bundle_{scheme}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/vllm_bundle_{scheme}.tsv"
    conda:
        "../envs/llm-compressor.yaml"
    params:
        config_dir=CONFIG_DIR,
        target=TARGET_PROFILE_DIGEST,
        engine=compress_engine,
        code=fingerprint.of_stage("compress"),
    shell:
        "deepcast compress bundle --artifact {input.compressed} --scheme {wildcards.scheme}"
        " --target {wildcards.target} --engine {params.engine} --config-dir {params.config_dir}"
        " --out {output.bundle}"
        " > {log} 2>&1"


rule vllm_validate:
    input:
        unpack(teacher_checkpoint_inputs),
        bundle="results/targets/{target}/{model}/{revision}/vllm/{scheme}/bundle",
        checkpoint="results/models/{model}/{revision}/checkpoint",
        reference="results/models/{model}/{revision}/reference",
        plan="results/targets/{target}/{model}/{revision}/plan.json",
    output:
        validation=directory("results/targets/{target}/{model}/{revision}/vllm/{scheme}/validation"),
    log:
        "logs/{target}/{model}/{revision}/vllm_validate_{scheme}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/vllm_validate_{scheme}.tsv"
    conda:
        "../envs/llm-compressor.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=4, gpu=2),
    params:
        settings=stage_settings("evaluation"),
        gates=stage_settings("validation"),
        config_dir=CONFIG_DIR,
        teacher=teacher_checkpoint_option,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("compress"),
    shell:
        "deepcast compress validate --bundle {input.bundle} --checkpoint {input.checkpoint} {params.teacher}"
        " --reference {input.reference} --scheme {wildcards.scheme}"
        " --settings {params.settings:q} --gates {params.gates:q}"
        " --target {wildcards.target} --config-dir {params.config_dir} --plan {input.plan}"
        " --out {output.validation} > {log} 2>&1"
