# GGUF branch on llama.cpp's own tools. Shared per model revision: the base GGUF (16-bit, or Q8_0 on
# the disk-lean route), the importance matrix, the quantized GGUFs and the base's logits for KL divergence.
# Per target: the llama-server bundle and its validation.


rule gguf_convert:
    input:
        checkpoint="results/models/{model}/{revision}/checkpoint",
    output:
        gguf=directory("results/models/{model}/{revision}/gguf/{dtype}"),
    log:
        "logs/{model}/{revision}/gguf_convert_{dtype}.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/llama-cpp.yaml"
    resources:
        mem_mb=host_memory(cpu=0.5, gpu=0.5),
    params:
        dtype="{dtype}",
        llama_cpp=LLAMA_CPP_OPTION,
        code=fingerprint.of_stage("gguf"),
    shell:
        "deepcast gguf convert --checkpoint {input.checkpoint} --outtype {params.dtype}"
        " --out {output.gguf} {params.llama_cpp} > {log} 2>&1"


rule gguf_imatrix:
    input:
        base=gguf_base_dir,
        calibration="results/models/{model}/{revision}/calibration",
    output:
        imatrix=directory("results/models/{model}/{revision}/gguf/imatrix"),
    log:
        "logs/{model}/{revision}/gguf_imatrix.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/llama-cpp.yaml"
    threads: ALL_CORES
    resources:
        gpu=gguf_base_gpus,
        mem_mb=host_memory(cpu=1, gpu=1, overhead_gb=job_resources.LLAMA_CPP_OVERHEAD_GB),
    params:
        context=SETTINGS.calibration.sequence_length,
        llama_cpp=LLAMA_CPP_OPTION,
        code=fingerprint.of_stage("gguf"),
    shell:
        "deepcast gguf imatrix --base {input.base} --calibration {input.calibration}"
        " --context {params.context} --threads {threads} --out {output.imatrix}"
        " {params.llama_cpp} > {log} 2>&1"


rule gguf_quantize:
    input:
        unpack(gguf_quantize_inputs),
    output:
        gguf=directory("results/models/{model}/{revision}/gguf/{quant}"),
    log:
        "logs/{model}/{revision}/gguf_quantize_{quant}.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/llama-cpp.yaml"
    threads: ALL_CORES
    resources:
        mem_mb=host_memory(cpu=0.2, gpu=0.2, overhead_gb=job_resources.LLAMA_CPP_OVERHEAD_GB),
    params:
        qtype=gguf_quant_type,
        options=gguf_quantize_options,
        llama_cpp=LLAMA_CPP_OPTION,
        code=fingerprint.of_stage("gguf"),
    shell:
        "deepcast gguf quantize --base {input.base}"
        " --type {params.qtype} {params.options} --threads {threads} --out {output.gguf}"
        " {params.llama_cpp} > {log} 2>&1"


rule gguf_kld_base:
    input:
        base=gguf_base_dir,
        evaluation_text=f"{CORPUS_DIR}/evaluation.txt",
    output:
        kld_base=directory("results/models/{model}/{revision}/gguf/kld-base"),
    log:
        "logs/{model}/{revision}/gguf_kld_base.log",
    # Shared by every target: computed once, and across checkouts through SNAKEMAKE_OUTPUT_CACHE;
    # wall time and peak memory are in the artifact's manifest (a cached rule has no benchmark file).
    cache: "omit-software"
    conda:
        "../envs/llama-cpp.yaml"
    threads: ALL_CORES
    resources:
        gpu=gguf_base_gpus,
        mem_mb=host_memory(cpu=1, gpu=1, overhead_gb=job_resources.LLAMA_CPP_OVERHEAD_GB),
    params:
        settings=stage_settings("evaluation"),
        llama_cpp=LLAMA_CPP_OPTION,
        code=fingerprint.of_stage("gguf"),
    shell:
        "deepcast gguf kld-base --base {input.base} --evaluation-text {input.evaluation_text}"
        " --settings {params.settings:q} --threads {threads} --out {output.kld_base}"
        " {params.llama_cpp} > {log} 2>&1"


rule gguf_bundle:
    input:
        artifact=gguf_artifact,
        base=gguf_base_dir,
    output:
        bundle=directory("results/targets/{target}/{model}/{revision}/llama.cpp/{quant}/bundle"),
    log:
        "logs/{target}/{model}/{revision}/gguf_bundle_{quant}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/gguf_bundle_{quant}.tsv"
    conda:
        "../envs/llama-cpp.yaml"
    params:
        qtype=gguf_quant_type,
        planned_flags=gguf_planned_flags,
        split_max_size=SETTINGS.gguf.split_max_size,
        config_dir=CONFIG_DIR,
        llama_cpp=LLAMA_CPP_OPTION,
        target=TARGET_PROFILE_DIGEST,
        code=fingerprint.of_stage("gguf"),
    shell:
        "deepcast gguf bundle --artifact {input.artifact} --base {input.base}"
        " --target {wildcards.target} --type {params.qtype} --split-max-size {params.split_max_size}"
        " --config-dir {params.config_dir} --expect-flags {params.planned_flags:q}"
        " --out {output.bundle} {params.llama_cpp} > {log} 2>&1"


rule gguf_validate:
    input:
        unpack(teacher_kld_inputs),
        bundle="results/targets/{target}/{model}/{revision}/llama.cpp/{quant}/bundle",
        kld_base="results/models/{model}/{revision}/gguf/kld-base",
        reference="results/models/{model}/{revision}/reference",
        plan="results/targets/{target}/{model}/{revision}/plan.json",
    output:
        validation=directory(
            "results/targets/{target}/{model}/{revision}/llama.cpp/{quant}/validation"
        ),
    log:
        "logs/{target}/{model}/{revision}/gguf_validate_{quant}.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/gguf_validate_{quant}.tsv"
    conda:
        "../envs/llama-cpp.yaml"
    threads: ALL_CORES
    resources:
        gpu=gguf_validate_gpus,
        mem_mb=gguf_validate_memory,
    params:
        settings=stage_settings("evaluation"),
        gates=stage_settings("validation"),
        config_dir=CONFIG_DIR,
        target=TARGET_PROFILE_DIGEST,
        llama_cpp=LLAMA_CPP_OPTION,
        teacher=teacher_kld_option,
        code=fingerprint.of_stage("gguf"),
    shell:
        "deepcast gguf validate --bundle {input.bundle} --kld-base {input.kld_base} {params.teacher}"
        " --reference {input.reference} --settings {params.settings:q} --gates {params.gates:q}"
        " --target {wildcards.target} --config-dir {params.config_dir} --plan {input.plan} --threads {threads}"
        " --out {output.validation} {params.llama_cpp} > {log} 2>&1"
