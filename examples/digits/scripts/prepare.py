"""Split scikit-learn's bundled digits into stratified train and test sets."""

import numpy as np
from digits_common import start_logging
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
log = start_logging(snakemake.log[0])

features, labels = load_digits(return_X_y=True)
train_x, test_x, train_y, test_y = train_test_split(
    features,
    labels,
    test_size=snakemake.params.test_fraction,
    stratify=labels,
    random_state=snakemake.params.seed,
)
np.savez_compressed(snakemake.output.train, features=train_x, labels=train_y)
np.savez_compressed(snakemake.output.test, features=test_x, labels=test_y)
log.info("train: %d images, test: %d images", len(train_y), len(test_y))
