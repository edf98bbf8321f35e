"""What a user sees at the end of a job: `curves.png` and a short summary on the terminal.

    python -m arvision.summary stage --workdir W --name train -- arvision train ...   # timed stage
    python -m arvision.summary report --workdir W --eval W/eval --job_start EPOCH_S \
        [--floor experiments/results/domain_classifier.json]

`stage` runs one command and appends its wall time to `W/stage_times.json` (the job's stages in
order). `report` draws `curves.png` beside the eval's `samples.png` (training loss over steps for the
generator and, when it was trained here, the tokenizer; the in-training eval metrics over steps)
and prints where the files are, the final metrics next to the real-data floor at the same sample
count (train-vs-test real images, from the floor JSON when given) and the wall time per stage. It
also writes the summary as `W/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STAGES = "stage_times.json"
# Domain metrics shown, with the direction that is better.
SHOWN = (
  ("class_accuracy", "class accuracy", "higher"),
  ("fd_fmnist", "FD (fmnist features)", "lower"),
  ("precision_fmnist", "precision", "higher"),
  ("recall_fmnist", "recall", "higher"),
)


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_stages(workdir: str) -> list[dict]:
  path = os.path.join(workdir, STAGES)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def run_stage(workdir: str, name: str, cmd: list[str]) -> int:
  """Runs `cmd`, appends `{name, wall_s, start, rc}` to `W/stage_times.json`; returns its rc."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  rc = subprocess.call(cmd)
  stages = [s for s in read_stages(workdir) if s["name"] != name]
  stages.append(dict(name=name, wall_s=round(time.time() - t0, 1), start=round(t0, 1), rc=rc))
  with open(os.path.join(workdir, STAGES), "w") as f:
    json.dump(stages, f, indent=1)
  return rc


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(workdir: str, out: str, final: dict | None = None) -> str:
  """`curves.png`: training loss (generator, and tokenizer if trained here) and eval metrics."""
  import matplotlib

  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  gen = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  tok = _read_jsonl(os.path.join(workdir, "tokenizer", "metrics.jsonl"))
  eval_keys = [k for k, _, _ in SHOWN if any(f"eval/{k}" in r for r in gen)]
  panels = 1 + bool(tok) + len(eval_keys)
  fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.0), squeeze=False)
  axes = list(axes[0])
  ax = axes.pop(0)
  ax.plot(*_series(gen, "train/loss"), label="train")
  if any("eval/heldout_loss" in r for r in gen):
    ax.plot(*_series(gen, "eval/heldout_loss"), "o-", label="held-out")
  ax.set(title="generator loss", xlabel="step")
  ax.legend()
  if tok:
    ax = axes.pop(0)
    ax.plot(*_series(tok, "train/loss"))
    ax.set(title="tokenizer loss", xlabel="step")
  names = {k: n for k, n, _ in SHOWN}
  for k in eval_keys:
    ax = axes.pop(0)
    ax.plot(*_series(gen, f"eval/{k}"), "o-", label="in training (small N)")
    if final and k in final.get("metrics", {}):
      ax.plot(
        [final["step"]], [final["metrics"][k]], "r*", ms=10, label=f"final N={final['num_samples']}"
      )
    ax.set(title=names[k], xlabel="step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=80)
  plt.close(fig)
  return out


def _fmt_s(s: float) -> str:
  m, s = divmod(int(round(s)), 60)
  return f"{m}m{s:02d}s" if m else f"{s}s"


def summarize(workdir: str, eval_dir: str, job_start: float | None = None, floor_json: str = "",
              now: float | None = None) -> dict:  # fmt: skip
  """Writes `curves.png` (beside `samples.png`) and `W/summary.json`; returns the summary."""
  now = time.time() if now is None else now
  final = None
  mpath = os.path.join(eval_dir, "metrics.json")
  if os.path.exists(mpath):
    with open(mpath) as f:
      final = json.load(f)
  out_dir = eval_dir if os.path.isdir(eval_dir) else workdir
  curves = plot_curves(workdir, os.path.join(out_dir, "curves.png"), final)
  floor = None
  if final and floor_json and os.path.exists(floor_json):
    with open(floor_json) as f:
      floor = json.load(f).get("floor_train_vs_test", {}).get(str(final["num_samples"]))
  stages = read_stages(workdir)
  if job_start is not None and stages:
    setup = stages[0]["start"] - job_start
    stages = [dict(name="setup", wall_s=round(setup, 1))] + stages
  total = now - job_start if job_start is not None else sum(s["wall_s"] for s in stages)
  tokenizer = "trained in this job" if os.path.isdir(os.path.join(workdir, "tokenizer")) else ""
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.exists(cfg_path) and not tokenizer:
    with open(cfg_path) as f:
      tokenizer = str(json.load(f).get("tokenizer", {}).get("checkpoint", ""))
  summary = dict(
    samples=os.path.join(out_dir, "samples.png"),
    curves=curves,
    num_samples=final and final["num_samples"],
    step=final and final["step"],
    metrics=final and {k: final["metrics"].get(k) for k, _, _ in SHOWN},
    floor=floor and {k: floor.get(k) for k, _, _ in SHOWN},
    floor_source=floor_json if floor else "",
    stages=stages,
    total_wall_s=round(total, 1),
    tokenizer=tokenizer,
  )
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def render(summary: dict) -> str:
  lines = [f"Done in {_fmt_s(summary['total_wall_s'])}."]
  if summary["stages"]:
    lines.append("  " + ", ".join(f"{s['name']} {_fmt_s(s['wall_s'])}" for s in summary["stages"]))
  if summary["tokenizer"]:
    lines.append(f"  tokenizer: {summary['tokenizer']}")
  lines.append(f"samples: {summary['samples']}")
  lines.append(f"curves:  {summary['curves']}")
  if summary["metrics"]:
    floor = summary["floor"] or {}
    lines.append(
      f"metrics of {summary['num_samples']} samples (step {summary['step']}) vs real images "
      f"at the same N:"
    )
    lines.append(f"  {'':22s}{'samples':>10s}{'real':>10s}")
    for k, name, better in SHOWN:
      v, r = summary["metrics"].get(k), floor.get(k)
      if v is None:
        continue
      real = f"{r:10.3f}" if r is not None else f"{'-':>10s}"
      lines.append(f"  {name:22s}{v:10.3f}{real}   ({better} is better)")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  st = sub.add_parser("stage", help="run one timed stage: ... -- COMMAND ARGS")
  st.add_argument("--workdir", required=True)
  st.add_argument("--name", required=True)
  st.add_argument("command", nargs=argparse.REMAINDER)
  rp = sub.add_parser("report", help="curves.png + the end-of-job summary")
  rp.add_argument("--workdir", required=True)
  rp.add_argument("--eval", dest="eval_dir", help="the `arvision eval --out` dir (W/eval)")
  rp.add_argument("--job_start", type=float, help="epoch seconds when the job began (setup)")
  rp.add_argument("--floor", default="", help="JSON with floor_train_vs_test[N] (real data)")
  args = ap.parse_args(argv)
  if args.cmd == "stage":
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
      ap.error("stage needs a command after --")
    return run_stage(args.workdir, args.name, cmd)
  s = summarize(
    args.workdir, args.eval_dir or os.path.join(args.workdir, "eval"), args.job_start, args.floor
  )
  print("\n" + render(s))
  return 0


if __name__ == "__main__":
  sys.exit(main())
