"""lmlab's full fine-tuning of all-MiniLM-L6-v2 on SST-2 beside the same fine-tuning done with transformers + torch, in
one invocation: for each seed, `python -m train.main --config=configs/finetune.py:task=sst2,strategy=full` and then
`benchmarks/finetune_reference.py --seeds=SEED`, one process each, one after the other, so the two see the same
machine. Both use max length 64, batch 32, AdamW (weight decay 0.01, clip 1.0), lr 5e-5 with 6% linear warmup then
linear decay, dropout 0.1, the checkpoint's pooler over [CLS], and the same number of epochs; both score dev.tsv after
the last step. Prints dev accuracy and training examples/s side by side (lmlab: the median of its logged training
windows; torch: the median of its epochs, evaluation excluded from both) with the mean +- std over seeds; asserts
nothing.

  python benchmarks/finetune_parity.py                          # 3 epochs, seeds 13, 21, 42 (about an hour on 2 cores)
  python benchmarks/finetune_parity.py --epochs=1 --seeds=13 --json
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # train/core/pretrained.py locates the packaged checkpoints

_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs for both.")
_SEEDS = flags.DEFINE_list("seeds", ["13", "21", "42"], "One lmlab run and one torch run per seed.")
_DATA = flags.DEFINE_string("data", str(_ROOT.parent / "shared" / "data" / "sst2"),
                            "Folder with train.tsv and dev.tsv (sentence<TAB>label).")
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Where the lmlab runs go (one folder per seed); '': a temporary folder, "
    "removed afterwards.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def _model_dir() -> Path:
  from train.core import pretrained
  try:
    return Path(pretrained.packaged("all-MiniLM-L6-v2"))
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None


def _run(cmd, log):
  """Runs one process with its output going to `log`; returns its wall time in seconds."""
  t0 = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.run(cmd, cwd=_ROOT, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
  if rc:
    raise SystemExit(f"{' '.join(map(str, cmd))} exited {rc}; its output is in {log}")
  return time.perf_counter() - t0


def run_lmlab(seed: int, workdir: Path, data: Path) -> dict:
  if workdir.exists():
    shutil.rmtree(workdir)  # a fresh run, never a resume of an earlier one
  workdir.parent.mkdir(parents=True, exist_ok=True)
  log = workdir.parent / f"{workdir.name}.log"
  wall = _run([
      sys.executable, "-m", "train.main", "--config=configs/finetune.py:task=sst2,strategy=full",
      f"--workdir={workdir}", f"--config.model.init_from={_model_dir()}", f"--config.data.train={data / 'train.tsv'}",
      f"--config.data.dev={data / 'dev.tsv'}", "--config.data.seq_len=64", f"--config.train.epochs={_EPOCHS.value}",
      f"--config.seed={seed}"
  ], log)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  train = [r for r in rows if r["split"] == "train"]
  last = max(r["step"] for r in rows)
  dev = [r for r in rows if r["split"] == "eval" and r["step"] == last]
  batch = json.loads((workdir / "config.json").read_text())["config"]["data"]["batch_size"]
  return {
      "seed": seed,
      "steps": last,
      "dev_accuracy": dev[-1]["accuracy"],
      "train_examples_per_s": float(np.median([r["steps_per_sec"] for r in train])) * batch,
      "wall_s": wall
  }


def run_torch(seed: int, data: Path, log: Path) -> dict:
  out = log.with_suffix(".json")
  t0 = time.perf_counter()
  with open(out, "w") as f, open(log, "w") as err:
    rc = subprocess.run([
        sys.executable,
        str(_ROOT / "benchmarks" / "finetune_reference.py"), "--json", f"--seeds={seed}", f"--epochs={_EPOCHS.value}",
        f"--data={data}"
    ], cwd=_ROOT, stdout=f, stderr=err, check=False).returncode
  wall = time.perf_counter() - t0
  if rc:
    raise SystemExit(f"finetune_reference.py exited {rc}; its output is in {log}")
  run = json.loads(out.read_text())["runs"][0]
  return {
      "seed": seed,
      "steps": run["steps"],
      "dev_accuracy": run["final_dev_accuracy"],
      "train_examples_per_s": float(np.median([e["train_examples_per_s"] for e in run["epochs"]])),
      "wall_s": wall
  }


def _summary(runs) -> dict:
  acc = np.array([r["dev_accuracy"] for r in runs]) * 100
  return {
      "dev_accuracy_mean": float(acc.mean()),
      "dev_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
      "train_examples_per_s_median": float(np.median([r["train_examples_per_s"] for r in runs])),
      "wall_s_mean": float(np.mean([r["wall_s"] for r in runs]))
  }


def main(argv):
  del argv
  data = Path(_DATA.value).resolve()
  root = Path(_WORKDIR.value).resolve() if _WORKDIR.value else Path(tempfile.mkdtemp(prefix="finetune_parity_"))
  lm, th = [], []
  try:
    for s in map(int, _SEEDS.value):
      lm.append(run_lmlab(s, root / f"lmlab_seed{s}", data))
      th.append(run_torch(s, data, root / f"torch_seed{s}.log"))
      if not _JSON.value:
        print(
            f"seed {s}: lmlab dev {100 * lm[-1]['dev_accuracy']:.2f}, {lm[-1]['train_examples_per_s']:.1f} ex/s, "
            f"{lm[-1]['wall_s']:.0f} s | torch dev {100 * th[-1]['dev_accuracy']:.2f}, "
            f"{th[-1]['train_examples_per_s']:.1f} ex/s, {th[-1]['wall_s']:.0f} s", flush=True)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(root, ignore_errors=True)
  result = {
      "epochs": _EPOCHS.value,
      "lmlab": lm,
      "torch": th,
      "lmlab_summary": _summary(lm),
      "torch_summary": _summary(th)
  }
  result["examples_per_s_ratio"] = (result["lmlab_summary"]["train_examples_per_s_median"]
                                    / result["torch_summary"]["train_examples_per_s_median"])
  if _JSON.value:
    print(json.dumps(result, indent=1))
    return
  print(f"\nall-MiniLM-L6-v2, SST-2 full fine-tuning, {_EPOCHS.value} epoch(s), seeds {', '.join(_SEEDS.value)}; "
        f"{os.cpu_count()} CPUs")
  print("| | dev accuracy (mean +- std) | per seed | train ex/s (median) | wall per run |\n|---|---|---|---|---|")
  for name, runs in (("lmlab", lm), ("transformers + torch", th)):
    s = result[f"{'lmlab' if name == 'lmlab' else 'torch'}_summary"]
    print(f"| {name} | {s['dev_accuracy_mean']:.2f} +- {s['dev_accuracy_std']:.2f} | "
          f"{', '.join('%.2f' % (100 * r['dev_accuracy']) for r in runs)} | {s['train_examples_per_s_median']:.1f} | "
          f"{s['wall_s_mean']:.0f} s |")
  print(f"examples/s, lmlab / torch: {result['examples_per_s_ratio']:.2f}x")


if __name__ == "__main__":
  app.run(main)
