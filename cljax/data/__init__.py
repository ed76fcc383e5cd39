"""Input data: `sources` (random-access image sources), `pipeline` (grain), `augment` (device).

Submodules are imported where used (`from cljax.data import sources`), so importing one of them
does not pull in the others' dependencies (grain, tfds, dm_pix).
"""
