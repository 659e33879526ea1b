# One summary per model and target, built from every validation and the plan; Snakemake's report
# (`snakemake --report report.html`) embeds its files under the categories below.


rule report:
    input:
        unpack(report_inputs),
    output:
        table=report(
            "results/targets/{target}/{model}/{revision}/summary/table.html",
            caption="../report/table.rst",
            category="1. Quality",
            labels={"figure": "artifacts"},
        ),
        plot=report(
            "results/targets/{target}/{model}/{revision}/summary/quality-vs-size.svg",
            caption="../report/plot.rst",
            category="1. Quality",
            labels={"figure": "quality against size"},
        ),
        plan=report(
            "results/targets/{target}/{model}/{revision}/summary/plan.html",
            caption="../report/plan.rst",
            category="2. Plan",
            labels={"figure": "chosen and refused"},
        ),
        provenance=report(
            "results/targets/{target}/{model}/{revision}/summary/provenance.html",
            caption="../report/provenance.rst",
            category="3. Provenance",
            labels={"figure": "commands and tools"},
        ),
    log:
        "logs/{target}/{model}/{revision}/report.log",
    benchmark:
        "benchmarks/{target}/{model}/{revision}/report.tsv"
    conda:
        "../envs/deepcast.yaml"
    params:
        target_dir="results/targets/{target}/{model}/{revision}",
        code=fingerprint.of_stage("report"),
    shell:
        "deepcast report summary --target-dir {params.target_dir} --plan {input.plan}"
        " --reference {input.reference} --out {params.target_dir}/summary > {log} 2>&1"
