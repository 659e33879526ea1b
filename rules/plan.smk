# The plan for the target: every candidate with its arithmetic, the chosen formats, the refusals.
# The DAG already follows it (rules/common.smk); this file records it for the report and the bundle.


rule plan:
    input:
        unpack(plan_inputs),
    output:
        plan="results/targets/{target}/{model}/{revision}/plan.json",
    log:
        "logs/{target}/{model}/{revision}/plan.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/plan.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        model=plan_model,
        config_dir=CONFIG_DIR,
        options=plan_options,
        code=fingerprint.of_stage("plan"),
    shell:
        "deepcast plan --model {params.model:q} --target {wildcards.target}"
        " --config-dir {params.config_dir} {params.options} --out {output.plan} > {log} 2>&1"
