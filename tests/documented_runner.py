"""Parses, and optionally runs at tiny size, documented commands of one cljax entry point.

``python tests/documented_runner.py PROGRAM JOBS.json`` imports PROGRAM (``cljax.main``,
``cljax.evaluate``, ``cljax.bench`` or ``cljax.data.prepare``) once, then for each job
``{"args": [...], "parse": bool, "run": bool, "names": [...], "shrink": bool}`` parses the arguments
exactly as the command line does (absl flags, the config file, its ``--config.a.b=v``
overrides), checks that each flag name in ``names`` is one the program (or the config)
knows, and for ``run`` jobs shrinks the parsed config (:func:`shrink`, unless ``shrink`` is
false) and calls the program's ``main``. :func:`run_jobs` starts it from a test. One line per job
on stdout: ``MARK {"index", "status", "error", "seconds"}``, status "ok", "exit N" or "raised".
One process for all the jobs of a program: JAX is imported once, and the compiled programs
of one job are reused by the next where they are the same.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

from absl import flags

from cljax import cli

MARK = "documented-command-result"  # Starts each result line (the programs print JSON too).


def shrink(config) -> None:
  """The run at tiny size, whatever the recipe: 2 steps of 16 synthetic 32 px images (time
  series: 16 of the smallest bundled set), at most 2 local crops, a one-block encoder and
  small heads. The method, the encoder's kind, the optimiser and every other choice of the
  recipe stay."""
  c = config
  c.train.num_steps, c.train.log_every_steps = 2, 1
  c.train.checkpoint_every_steps = 1000
  if c.data.get("modality", "image") == "series":
    # The smallest bundled set in place of the user's (GunPoint: 50 series of 150), and a
    # two-block encoder.
    c.data.name, c.data.data_dir = "GunPoint", ""
    c.data.global_batch_size, c.evals.knn_at_end, c.evals.batch_size = 16, False, 32
    c.model.tsencoder.depth, c.model.tsencoder.hidden_dims, c.model.tsencoder.output_dims = 1, 8, 16
    return
  c.data.source, c.data.num_examples, c.data.num_classes = "synthetic", 64, 10
  c.data.num_workers, c.data.global_batch_size = 0, 16
  c.data.image_size, c.data.canvas_size = 32, 64
  c.data.augment.local_crop_size = min(c.data.augment.local_crop_size, 16)
  if c.data.augment.get("num_local_crops"):
    c.data.augment.num_local_crops = min(c.data.augment.num_local_crops, 2)
  c.evals.knn_at_end, c.evals.batch_size = False, 32
  c.model.dtype = "float32"
  if c.model.name == "resnet":
    c.model.stage_sizes, c.model.num_filters, c.model.width_multiplier = (1,), 8, 1
  elif c.model.name == "vit_dinov2":
    c.model.variant, c.model.img_size = "custom:dim=16,depth=1,heads=2,patch=8", 32
  else:
    c.model.variant = "custom:hidden=16,depth=1,heads=2,mlp=32,patch=8"
  for section in ("head", "predictor"):
    for key, value in (("hidden_dim", 32), ("output_dim", 16)):
      # A one-layer head is a classifier (the supervised baseline): one output per class.
      if section in c and c[section].get(key) and c[section].get("num_layers", 2) > 1:
        c[section][key] = value
  if "clip" in c and c.clip.captions == "file":
    c.clip.captions = "templates"  # The caption files of the docs are the user's own.
  sizes = {
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "swav": {"num_prototypes": 16},
    "moco": {"queue_size": 64},
    "clip": {"embed_dim": 16, "text_width": 16, "text_depth": 1, "text_heads": 2},
  }
  for section, values in sizes.items():
    for key, value in values.items():
      if section in c and key in c[section]:
        c[section][key] = value
  if "dinov2" in c:
    for head in (c.dinov2.head, c.dinov2.ibot_head):
      head.out_dim, head.hidden_dim, head.bottleneck_dim = 64, 32, 16


def _parse(program: str, module, argv: list[str], define: dict | None):
  sys.argv = argv
  # The overrides of the last command's config are flags of their own: forget them.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  rest = cli.parse_flags(argv)
  holder = define["config"] if define else flags.FLAGS["config"]
  return rest, holder.value


def unknown_names(names: list[str], config) -> list[str]:
  """The flag names (``--name``, ``--noname``, ``--config.a.b``) this program does not know."""
  unknown = []
  for name in names:
    if name.startswith("config."):
      node = config
      for part in name.split(".")[1:]:
        node = node[part] if node is not None and hasattr(node, "keys") and part in node else None
      known = node is not None or config is None
    else:
      negated = name.startswith("no") and name[2:] in flags.FLAGS
      known = name in flags.FLAGS or (negated and flags.FLAGS[name[2:]].boolean)
    if not known:
      unknown.append(name)
  return unknown


def run_jobs(program: str, jobs: list[dict], tmp: str) -> list[dict]:
  """Runs ``jobs`` of ``program`` in one fresh process, its compilation cache in ``tmp``.

  Returns one result per job, ``{"status", "error", "seconds"}``; a job the process did not
  reach (it died) is "raised" with the process's stderr as its error. The process sees one
  CPU device, as a user's does (the suite's 8 fake devices are left out).
  """
  path = os.path.join(tmp, f"jobs_{program.replace('.', '_')}.json")
  with open(path, "w") as f:
    json.dump(jobs, f)
  env = dict(os.environ, CLJAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "compilation_cache"))
  # LLVM's optimisations cost more than they save on 2-step runs of tiny models.
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_backend_optimization_level=0"
  ).strip()
  out = subprocess.run(
    [sys.executable, __file__, program, path],
    cwd=pathlib.Path(__file__).resolve().parents[1],
    capture_output=True,
    text=True,
    env=env,
    timeout=1200,
  )
  results = {}
  for line in out.stdout.splitlines():
    if line.startswith(MARK + " "):
      result = json.loads(line[len(MARK) + 1 :])
      results[result.pop("index")] = result
  died = {"status": "raised", "error": f"the runner died: {out.stderr[-3000:]}", "seconds": 0}
  return [results.get(i, died) for i in range(len(jobs))]


def main() -> None:
  program, jobs_file = sys.argv[1], sys.argv[2]
  try:  # A package's command line is its __main__.
    module = importlib.import_module(f"{program}.__main__")
  except ModuleNotFoundError:
    module = importlib.import_module(program)
  # cljax.data.prepare defines its flags only when run as a program.
  define = module._define_flags() if program == "cljax.data.prepare" else None
  run = (lambda argv: module.main(argv, define)) if define else module.main
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags.
  with open(jobs_file) as f:
    jobs = json.load(f)
  for index, job in enumerate(jobs):
    argv = [program, *job["args"]]
    status, error = "ok", ""
    captured = io.StringIO()
    start = time.perf_counter()
    try:
      with contextlib.redirect_stderr(captured):
        rest, config = _parse(program, module, argv, define) if job["parse"] else ([], None)
        unknown = unknown_names(job["names"], config)
        if unknown:
          raise SystemExit(f"unknown flag(s) of {program}: {', '.join(unknown)}")
        if job["run"]:
          if job.get("shrink", True):
            shrink(config)
          run(rest)
    except SystemExit as e:
      message = e.code if isinstance(e.code, str) else captured.getvalue()[-2000:]
      status, error = ("exit 1" if isinstance(e.code, str) else f"exit {e.code}"), message
    except Exception:  # Reported to the test, which fails naming the command.
      status, error = "raised", traceback.format_exc()[-4000:]
    if status == "exit 0":
      status = "ok"
    seconds = round(time.perf_counter() - start, 1)
    result = {"index": index, "status": status, "error": error, "seconds": seconds}
    print(MARK, json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
