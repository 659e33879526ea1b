# Distillation (off unless distill.students is set). Shared per teacher revision: the teacher's cached
# top-k signal or its completions. Per student: its checkpoint under results/models/<student>/<digest>/,
# which every downstream rule then takes like any other model, and its comparison with the teacher.


rule distill_signal:
    input:
        unpack(signal_inputs),
    output:
        signal=directory("results/models/{model}/{revision}/distill/signal"),
    log:
        "logs/{model}/{revision}/distill_signal.log",
    wildcard_constraints:
        model=TEACHER_MODEL,
    # Shared by every target and student: computed once, and across checkouts through
    # SNAKEMAKE_OUTPUT_CACHE; wall time and peak memory are in the artifact's manifest.
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=2, gpu=1),
    params:
        options=signal_options,
        settings=signal_settings,
        llama_cpp=LLAMA_CPP_OPTION,
        code=fingerprint.of_stage("distill"),
    shell:
        "deepcast distill signal --teacher {input.teacher} --source {input.source} {params.options}"
        " --out {output.signal} --settings {params.settings:q} --threads {threads}"
        " {params.llama_cpp} > {log} 2>&1"


rule distill_sequences:
    input:
        unpack(sequences_inputs),
    output:
        sequences=directory("results/models/{model}/{revision}/distill/sequences"),
    log:
        "logs/{model}/{revision}/distill_sequences.log",
    wildcard_constraints:
        model=TEACHER_MODEL,
    cache: "omit-software"
    conda:
        "../envs/deepcast.yaml"
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=2, gpu=1),
    params:
        options=sequences_options,
        settings=sequences_settings,
        llama_cpp=LLAMA_CPP_OPTION,
        code=fingerprint.of_stage("distill"),
    shell:
        "deepcast distill sequences --teacher {input.teacher} --source {input.source} {params.options}"
        " --out {output.sequences} --settings {params.settings:q} {params.llama_cpp} > {log} 2>&1"


rule distill_train:
    input:
        unpack(train_inputs),
    output:
        checkpoint=directory("results/models/{model}/{revision}/checkpoint"),
    log:
        "logs/{model}/{revision}/distill_train.log",
    # Only students are trained; every other checkpoint is downloaded.
    wildcard_constraints:
        model=STUDENT_MODELS,
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=8, gpu=2),
    params:
        options=train_options,
        teacher=MODEL.name,
        settings=student_settings,
        code=fingerprint.of_stage("distill"),
    shell:
        "deepcast distill train --teacher {input.teacher} --teacher-name {params.teacher}"
        " --data {input.data} {params.options} --name {wildcards.model} --out {output.checkpoint}"
        " --settings {params.settings:q} > {log} 2>&1"


rule distill_evaluate:
    input:
        student="results/models/{model}/{revision}/checkpoint",
        teacher=checkpoint_dir(),
        reference=reference_dir(),
    output:
        distillation=directory("results/models/{model}/{revision}/distillation"),
    log:
        "logs/{model}/{revision}/distill_evaluate.log",
    wildcard_constraints:
        model=STUDENT_MODELS,
    conda:
        "../envs/deepcast.yaml"
    threads: ALL_CORES
    resources:
        gpu=ONE_GPU,
        mem_mb=host_memory(cpu=4, gpu=2),
    params:
        settings=stage_settings("evaluation"),
        code=fingerprint.of_stage("distill"),
    shell:
        "deepcast distill evaluate --student {input.student} --teacher {input.teacher}"
        " --reference {input.reference} --out {output.distillation} --settings {params.settings:q}"
        " > {log} 2>&1"


rule distill_summary:
    input:
        evaluations=distill_evaluations,
        reference=reference_dir(),
    output:
        students=report(
            "results/models/{model}/{revision}/distill/summary/students.html",
            caption="../report/distill.rst",
            category="4. Distillation",
            labels={"figure": "students against the teacher"},
        ),
        curves=report(
            "results/models/{model}/{revision}/distill/summary/loss-curves.svg",
            caption="../report/distill.rst",
            category="4. Distillation",
            labels={"figure": "loss curves"},
        ),
    log:
        "logs/{model}/{revision}/distill_summary.log",
    wildcard_constraints:
        model=TEACHER_MODEL,
    conda:
        "../envs/deepcast.yaml"
    params:
        evaluations=evaluation_options,
        teacher=MODEL.name,
        out="results/models/{model}/{revision}/distill/summary",
        code=fingerprint.of_stage("distill"),
    shell:
        "deepcast distill summary {params.evaluations} --reference {input.reference}"
        " --teacher-name {params.teacher} --out {params.out} > {log} 2>&1"
