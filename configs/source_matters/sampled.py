"""Source Matters (Juodelyte et al.), confounder 'sampled':
patient sex tied to the label (Atelectasis vs No Finding).

    python -m medtransfer_jax.train --workdir=runs/sampled \\
      --config=configs/source_matters/sampled.py:SOURCE,p=0.5[,fold=K,seed=S]

SOURCE: imagenet | radimagenet | random; ``p``: the share of female Atelectasis images in
training; the paper's CSVs exist for p in 0, 0.1, 0.2, 0.5, 0.8, 1. The other options and
the protocol shared by the four confounders are in
``medtransfer_jax/training/source_matters_protocol.py``; this file holds what is sampled's
own, read from DovileDo/source-matters ``gender.py``.
"""
from medtransfer_jax.training import presets, source_matters_protocol as protocol


def get_config(arg=None):
    c = protocol.config("sampled", arg, where=__file__)
    # The sex experiment's CSVs: 400 training images per p (200 Atelectasis, 200 No
    # Finding; train/val per fold in gender/F_<100p>/) and one fixed 400-image test
    # (male Atelectasis + female No Finding: the reversed, o.o.d. test).
    gender_dir, c.data.fold_csv_origin = presets.paper_csvs("source_matters", "chest14/gender")
    # F_<100p> follows data.confounder.p, also when an override sets p (the study does).
    c.data.fold_csv_dir = presets.percent_folder(f"{gender_dir}/F_", c.data.confounder, "p")
    c.data.fold_csv_test = f"{gender_dir}/test.csv"
    # Without CSVs (folds=kfold): positives female with probability p, male otherwise;
    # negatives male; the reversed test from held-out patients.
    c.data.confounder.attribute = "sex"
    c.data.confounder.attribute_positive = "F"
    c.data.confounder.attribute_negative = "M"
    return c
