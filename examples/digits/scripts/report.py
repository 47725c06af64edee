"""Rank all models by test accuracy into a Markdown report and a JSON summary."""

from digits_common import read_json, start_logging, write_json

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
log = start_logging(snakemake.log[0])
hyperparameters = snakemake.params.hyperparameters

results = [read_json(path) for path in snakemake.input]
# Best first; the name breaks ties so the order never depends on file order.
results.sort(
    key=lambda result: (-result["accuracy"], -result["macro_f1"], result["model"])
)
best = results[0]

lines = [
    "# Handwritten digits: model comparison",
    "",
    f"{len(results)} models, each tested on the same {best['test_images']} images.",
    "",
    "| rank | model | hidden units | alpha | learning rate | accuracy | macro F1 |",
    "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
]
for rank, result in enumerate(results, start=1):
    settings = hyperparameters[result["model"]]
    lines.append(
        f"| {rank} | {result['model']} | {settings['hidden_units']} "
        f"| {settings['alpha']:g} | {settings['learning_rate']:g} "
        f"| {result['accuracy']:.4f} | {result['macro_f1']:.4f} |"
    )
lines += [
    "",
    f"## Confusion matrix of {best['model']}",
    "",
    "Rows are true digits, columns predicted digits.",
    "",
    "| true \\ predicted | "
    + " | ".join(str(label) for label in best["labels"])
    + " |",
    "| ---: |" + " ---: |" * len(best["labels"]),
]
for label, row in zip(best["labels"], best["confusion_matrix"], strict=True):
    lines.append(f"| {label} | " + " | ".join(str(count) for count in row) + " |")

with open(snakemake.output.report, "w", encoding="utf-8") as report:
    report.write("\n".join(lines) + "\n")

summary = {
    "best_model": best["model"],
    "models": {
        result["model"]: {
            "accuracy": result["accuracy"],
            "macro_f1": result["macro_f1"],
            "hyperparameters": hyperparameters[result["model"]],
        }
        for result in results
    },
}
write_json(snakemake.output.summary, summary)
log.info("best model: %s (accuracy %.6f)", best["model"], best["accuracy"])
