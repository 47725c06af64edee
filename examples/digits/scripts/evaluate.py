"""Score one trained model on the test split and write its metrics as JSON."""

import pickle
from pathlib import Path

import numpy as np
from digits_common import round_metric, start_logging, write_json
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from threadpoolctl import threadpool_limits

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
log = start_logging(snakemake.log[0])

with open(snakemake.input.model, "rb") as model_file:
    model = pickle.load(model_file)
with np.load(snakemake.input.test) as test:
    features, labels = test["features"], test["labels"]

with threadpool_limits(limits=1):
    predicted = model.predict(features)

classes = sorted(int(label) for label in np.unique(labels))
metrics = {
    "model": Path(snakemake.input.model).stem,
    "test_images": int(len(labels)),
    "accuracy": round_metric(accuracy_score(labels, predicted)),
    "macro_f1": round_metric(f1_score(labels, predicted, average="macro")),
    "labels": classes,
    # Rows are true digits, columns predicted digits, both in ``labels`` order.
    "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
}
write_json(snakemake.output[0], metrics)
log.info("accuracy %.6f, macro F1 %.6f", metrics["accuracy"], metrics["macro_f1"])
