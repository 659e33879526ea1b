# ONNX Runtime GenAI: the model builder's graph for an execution provider, shared per model revision;
# per target a bundle that chats through onnxruntime-genai, and its validation through it on this CPU.


rule onnx_build:
    input:
        checkpoint="results/models/{model}/{revision}/checkpoint",
    output:
        graph=directory("results/models/{model}/{revision}/onnx/{onnx_format}-{provider}"),
    log:
        "logs/{model}/{revision}/onnx_build_{onnx_format}-{provider}.log",
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        mem_mb=host_memory(cpu=3, gpu=3),
    params:
        settings=stage_settings("onnx"),
        code=fingerprint.of_stage("onnx"),
    shell:
        "deepcast onnx build --checkpoint {input.checkpoint} --format {wildcards.onnx_format}"
        " --provider {wildcards.provider} --settings {params.settings:q} --out {output.graph} > {log} 2>&1"


rule onnx_bundle:
    input:
        graph=onnx_artifact,
    output:
        bundle=directory(
            "results/targets/{target}/{model}/{revision}/onnxruntime-genai/{onnx_format}/bundle"
        ),
    log:
        "logs/{target}/{model}/{revision}/onnx_bundle_{onnx_format}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/onnx_bundle_{onnx_format}.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        config_dir=CONFIG_DIR,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("onnx"),
    shell:
        "deepcast onnx bundle --artifact {input.graph} --format {wildcards.onnx_format}"
        " --target {wildcards.target} --config-dir {params.config_dir} --out {output.bundle} > {log} 2>&1"


rule onnx_validate:
    input:
        unpack(teacher_checkpoint_inputs),
        bundle="results/targets/{target}/{model}/{revision}/onnxruntime-genai/{onnx_format}/bundle",
        reference="results/models/{model}/{revision}/reference",
        plan="results/targets/{target}/{model}/{revision}/plan.json",
    output:
        validation=directory(
            "results/targets/{target}/{model}/{revision}/onnxruntime-genai/{onnx_format}/validation"
        ),
    log:
        "logs/{target}/{model}/{revision}/onnx_validate_{onnx_format}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/onnx_validate_{onnx_format}.tsv"
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        mem_mb=host_memory(cpu=3, gpu=3),
    params:
        settings=stage_settings("evaluation"),
        gates=stage_settings("validation"),
        config_dir=CONFIG_DIR,
        teacher=teacher_checkpoint_option,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("onnx"),
    shell:
        "deepcast onnx validate --bundle {input.bundle} {params.teacher}"
        " --reference {input.reference} --format {wildcards.onnx_format}"
        " --settings {params.settings:q} --gates {params.gates:q}"
        " --target {wildcards.target} --config-dir {params.config_dir} --plan {input.plan}"
        " --out {output.validation} > {log} 2>&1"
