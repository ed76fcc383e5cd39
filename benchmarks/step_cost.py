"""What XLA compiles for cljax's ResNet-50 SimCLR step, against the bare reference step.

    python benchmarks/step_cost.py --batch=32 \
        --reference=../shared/reference/bare_simclr_step.py

Lowers and compiles (runs nothing) the train step of ``configs/simclr_r50.py`` on synthetic
data, as configured and with parts switched off (blur, all photometric augmentation, the
online probe), and the reference's bare step on the same number of views, on this
machine's backend; prints XLA's cost analysis (GFLOP, GB accessed) and the number of
all-reduce instructions of each. On a one-device mesh cljax's step holds none (its
BatchNorm then has no cross-device axis; see ``sharding.bn_axis_name``).
"""

from __future__ import annotations

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from cljax import defaults, xla_options
from cljax.bench.run import Trainer

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per step (two views each).")
_REFERENCE = flags.DEFINE_string(
  "reference",
  os.path.join(REPO, "..", "shared", "reference", "bare_simclr_step.py"),
  "The bare reference step script (skipped if missing).",
)


def _cost(compiled) -> tuple[float, float, int]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  all_reduces = len(re.findall(r"= \S+ all-reduce\(", compiled.as_text()))
  return ca.get("flops", 0.0) / 1e9, ca.get("bytes accessed", 0.0) / 1e9, all_reduces


def cljax_step(batch: int, *, photometric=True, blur=0.5, probe=True):
  config = defaults.load_sibling(__file__, "../configs/simclr_r50.py").get_config()
  config.data.source, config.data.num_classes = "synthetic", 1000
  config.data.global_batch_size = batch
  config.data.augment.photometric, config.data.augment.blur_prob = photometric, blur
  config.evals.online_probe = probe
  trainer = Trainer(config)
  run = trainer.run
  lowered = run.step_fn.lower(trainer.state, trainer.synthetic_batch(), run.step_rng)
  return _cost(lowered.compile())


def reference_step(path: str, views: int):
  spec = importlib.util.spec_from_file_location("bare_simclr_step", path)
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  model = ref.SimCLRNet(ref.ResNet(stages=(3, 4, 6, 3), block=ref.Bottleneck))
  x = jnp.zeros((views, 224, 224, 3), jnp.bfloat16)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:2], train=True))
  tx = optax.lars(learning_rate=0.3, weight_decay=1e-6, momentum=0.9)
  opt = jax.eval_shape(tx.init, variables["params"])

  def step(params, batch_stats, opt, x):  # As the reference's own step.
    def loss_fn(p):
      z, upd = model.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return ref.nt_xent(z.astype(jnp.float32)), upd["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  # Compiled as cljax's step is (no YNNPACK convolutions on CPU), so both costs are alike.
  options = xla_options.for_devices(jax.devices())
  lowered = jax.jit(step, compiler_options=options).lower(
    variables["params"], variables["batch_stats"], opt, x
  )
  return _cost(lowered.compile())


def main(argv):
  del argv
  batch = _BATCH.value
  rows = [
    ("cljax, as configured", cljax_step(batch)),
    ("cljax, no blur", cljax_step(batch, blur=0.0)),
    ("cljax, no photometric augmentation", cljax_step(batch, photometric=False)),
    ("cljax, neither, no online probe", cljax_step(batch, photometric=False, probe=False)),
  ]
  if os.path.exists(_REFERENCE.value):
    rows.append(("bare reference step", reference_step(_REFERENCE.value, 2 * batch)))
  print(f"ResNet-50, {2 * batch} views of 224 px, {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}, JAX {jax.__version__}")  # fmt: skip
  print("| step | GFLOP | GB accessed | all-reduces |\n|---|---|---|---|")
  for name, (gflop, gb, reduces) in rows:
    print(f"| {name} | {gflop:,.1f} | {gb:.2f} | {reduces} |")


if __name__ == "__main__":
  app.run(main)
