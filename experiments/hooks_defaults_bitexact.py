"""Do the raster and MAR variant hooks leave the defaults bit-identical? (issue 13)

Dumps the smoke raster and MAR families' outputs for fixed seeds (samples under three sampling
settings each, teacher-forced logits, losses in eval and train mode, loss gradients), then
compares two dumps element by element. Run the dump in the tree before the change and in the tree
after it, then compare:

  cd OLD && PYTHONPATH=OLD JAX_PLATFORMS=cpu python experiments/hooks_defaults_bitexact.py \\
      --dump /tmp/old.npz            # (this file copied there, or run from NEW with PYTHONPATH=OLD)
  cd NEW && JAX_PLATFORMS=cpu python experiments/hooks_defaults_bitexact.py --dump /tmp/new.npz
  python experiments/hooks_defaults_bitexact.py --compare /tmp/old.npz /tmp/new.npz \\
      --out experiments/results/hooks_defaults_bitexact.json

Uses only the families' public APIs (`sample_tokens`, `loss`, `init`), so the same file runs on
both trees. Params are the random init plus 0.05 N(0, 1) noise (the zero-initialised heads would
make every sample uniform).
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

RASTER_SETTINGS = (
  dict(cfg=2.0),
  dict(cfg=3.0, cfg_interval=3, temperature=0.7, top_k=5, top_p=0.9),
  dict(cfg=1.0, top_k=1),
)
MAR_SETTINGS = (
  dict(num_iter=4, cfg=1.0),
  dict(num_iter=4, cfg=2.5, temperature=0.9, num_diffusion_steps=5),
  dict(
    num_iter=3,
    cfg=3.0,
    cfg_schedule="constant",
    disa=True,
    disa_min_steps=2,
    num_diffusion_steps=4,
    clip_x0=2.0,
  ),
)


def _family(spec: str, attn_impl: str | None = None):
  from arvision import config_util, families  # noqa: PLC0415

  c = mlc.ConfigDict(config_util.load_config_file(spec).to_dict())
  if attn_impl:
    c.model.attn_impl = attn_impl
  tok = families.build(c.tokenizer.config)
  fam = families.build(c, tokenizer=tok)
  p = fam.init(jax.random.key(0), None)
  p = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), p)
  return fam, tok, p, {**p, "tokenizer": tok.init(jax.random.key(1), None)}


def _losses(res, name, fam, p, params, batch):
  loss = jax.jit(fam.loss, static_argnums=3)
  for i, train in enumerate((False, True)):
    value, metrics = loss(params, batch, jax.random.key(5), train)
    res[f"{name}_loss{i}"] = np.asarray(value)
  grad = jax.jit(
    jax.grad(
      lambda q: fam.loss({**q, "tokenizer": params["tokenizer"]}, batch, jax.random.key(5), True)[0]
    )
  )(p)
  res[f"{name}_grad"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad)])


def dump(out: str) -> None:
  res = {}
  labels = jnp.array([0, 3, 7, 10])
  fam, tok, p, params = _family("raster.py:smoke", attn_impl="xla")
  for i, kw in enumerate(RASTER_SETTINGS):
    img, codes, logits = fam.sample_tokens(
      params, labels, jax.random.key(11 + i), return_logits=True, **kw
    )
    res[f"raster_img{i}"], res[f"raster_codes{i}"] = np.asarray(img), np.asarray(codes)
    res[f"raster_logits{i}"] = np.asarray(logits)
  vocab = tok.config.model.vocab_size
  codes = jax.random.randint(jax.random.key(3), (4, fam.num_tokens), 0, vocab)
  _losses(res, "raster", fam, p, params, {"tokens": codes, "label": labels})
  fam, tok, p, params = _family("mar.py:smoke")
  img = jax.random.uniform(jax.random.key(4), (4, 16, 16, 1), minval=-1, maxval=1)
  _losses(res, "mar", fam, p, params, {"image": img, "label": labels % 4})
  for i, kw in enumerate(MAR_SETTINGS):
    images, tokens = fam.sample_tokens(params, labels % 4, jax.random.key(21 + i), **kw)
    res[f"mar_img{i}"], res[f"mar_tok{i}"] = np.asarray(images), np.asarray(tokens)
  np.savez(out, **res)
  print(f"wrote {len(res)} arrays to {out}")


def compare(old: str, new: str, out: str | None) -> dict:
  a, b = np.load(old), np.load(new)
  rows = {}
  for k in sorted(set(a.files) | set(b.files)):
    if k not in a.files or k not in b.files:
      rows[k] = dict(equal=False, missing_in="old" if k not in a.files else "new")
      continue
    x, y = a[k], b[k]
    same_shape = x.shape == y.shape
    diff = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if same_shape else None
    rows[k] = dict(equal=bool(same_shape and np.array_equal(x, y)), max_abs_diff=diff)
    print(f"{k:16s} {'equal' if rows[k]['equal'] else 'DIFFERENT'} max_abs_diff={diff}")
  rec = dict(
    what="raster + MAR smoke outputs, tree before vs after the variant hooks (issue 13)",
    all_equal=all(r["equal"] for r in rows.values()),
    rows=rows,
    raster_settings=[dict(s) for s in RASTER_SETTINGS],
    mar_settings=[dict(s) for s in MAR_SETTINGS],
    jax=jax.__version__,
    python=platform.python_version(),
    device=str(jax.devices()[0]),
  )
  if out:
    with open(out, "w") as f:
      json.dump(rec, f, indent=2)
  print("all equal:", rec["all_equal"])
  return rec


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dump", default="", help="write this tree's outputs to this .npz")
  ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two dumps to compare")
  ap.add_argument("--out", default="", help="with --compare: the JSON to write")
  args = ap.parse_args()
  if args.dump:
    dump(args.dump)
  if args.compare:
    compare(*args.compare, args.out or None)


if __name__ == "__main__":
  main()
