"""Fit one small neural network (scaler + MLP) on the training split."""

import pickle
import warnings

import numpy as np
from digits_common import start_logging
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
log = start_logging(snakemake.log[0])
settings = snakemake.params.hyperparameters

with np.load(snakemake.input[0]) as train:
    features, labels = train["features"], train["labels"]

model = make_pipeline(
    StandardScaler(),
    MLPClassifier(
        hidden_layer_sizes=(settings["hidden_units"],),
        alpha=settings["alpha"],
        learning_rate_init=settings["learning_rate"],
        max_iter=400,
        random_state=snakemake.params.seed,
    ),
)

# One BLAS thread: a multi-threaded matrix product may sum in a different
# order, and then the weights (and the metrics) differ between machines.
with threadpool_limits(limits=1), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ConvergenceWarning)
    model.fit(features, labels)

network = model[-1]
log.info("settings: %s", settings)
log.info("epochs: %d, final loss: %.6f", network.n_iter_, network.loss_)
for warning in caught:
    log.warning("%s", warning.message)

with open(snakemake.output[0], "wb") as output:
    pickle.dump(model, output)
