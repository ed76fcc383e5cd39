"""TS2Vec on a UCR/UEA time-series set: the official recipe, on a 2-core CPU in a minute.

    python -m cljax.main --config=configs/ts2vec_ucr.py --workdir=runs/ts2vec_gunpoint
    python -m cljax.main --config=configs/ts2vec_ucr.py:BasicMotions --workdir=runs/ts2vec_bm
    python -m cljax.main --config=configs/ts2vec_ucr.py:MySet --workdir=runs/ts2vec_mine \\
        --config.data.data_dir=/path/to/folder_with_MySet_TRAIN.ts_and_MySet_TEST.ts

The argument after the colon names the set: one of the seven bundled with sktime's wheel
(GunPoint, the default; ItalyPowerDemand, ArrowHead, OSULeaf, ACSF1, BasicMotions,
JapaneseVowels), or the NAME of ``NAME_TRAIN.ts``/``NAME_TEST.ts`` (UEA format) or
``NAME_TRAIN.tsv``/``NAME_TEST.tsv`` (UCR 2018) files in ``data.data_dir`` (the folder, or
its ``NAME/`` subfolder). Series are normalised as TS2Vec's ``datautils`` does (UCR sets the
archive left raw: train mean and std; UEA sets: per channel), NaN marks missing values and
the padding of shorter series.

Recipe (Yue et al., AAAI 2022; the official ``train.py`` and ``TS2Vec`` defaults): the
dilated-convolution encoder (input projection to 64, 10 residual blocks of kernel 3 and
dilation 2^i, GELU, a last block to 320), binomial timestamp masking, two overlapping random
crops compared on their shared timestamps, the hierarchical contrastive loss (alpha 0.5),
AdamW at a constant 0.001 (PyTorch's default weight decay 0.01), batch 8, 200 steps (the
official ``n_iters`` for sets of at most 100,000 values; 600 above), and evaluation of the
running average of the weights (its SWA model).

Hardware: a CPU. Expected result: TS2Vec's published accuracy (Yue et al., Table 9: e.g.
GunPoint 0.980, ArrowHead 0.857, OSULeaf 0.851) with the RBF-SVM protocol of
``benchmarks/ucr_table.py``, which runs this recipe per set and prints the table.
"""

from cljax import defaults


def get_config(dataset: str = "GunPoint"):
  c = defaults.base_config()
  c.method = "ts2vec"
  c.model.name = "ts2vec"
  c.model.dtype = "float32"
  c.data.modality = "series"
  c.data.source = "timeseries"
  c.data.name = dataset
  c.data.data_dir = ""  # "": the bundled sets; else the folder holding the set's files.
  c.data.global_batch_size = 8
  c.data.num_workers = 0

  c.optim.name = "adamw"
  c.optim.base_lr = 0.001
  c.optim.lr_scaling = "none"
  c.optim.lr_schedule = "constant"
  c.optim.weight_decay = 0.01  # PyTorch AdamW's default, which the official code keeps.
  c.optim.decay_mask = "all"
  c.optim.warmup_epochs = 0.0

  c.train.num_steps = 200
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 200
  c.evals.batch_size = 64
  c.evals.knn_k = 1  # The archives' nearest-neighbour classifier (their sets are small).
  return c
