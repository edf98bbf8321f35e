"""The model zoo: every official checkpoint arvision converts, by name (`arvision.load("var-d16")`).

Facts come from the official READMEs (FoundationVision/VAR @ 78b9539, FoundationVision/LlamaGen @
ce98ec4, LTH14/mar @ fe470ac) and /work/shared/reference/official-implementations.md:
- Hub repos and file names are the README download links (`huggingface.co/<repo>/resolve/main/
  <file>`). MAR's weights are not on the Hub from its authors: its README and `util/download.py`
  link Dropbox, so the MAR entries name that URL (`url`) and `arvision.load` says how to convert
  a downloaded file instead of fetching it.
- `fid`/`is_` are the README's headline numbers for the released weights (ImageNet 256x256, 50K
  samples, ADM suite for VAR/LlamaGen, MAR's torch-fidelity fork), `sample` the settings they were
  measured with. None where the README gives none.

`arvision zoo` prints this table with what is cached.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Entry:
  """One downloadable official checkpoint and how it becomes an arvision checkpoint."""

  name: str
  kind: str  # an `arvision convert` kind (arvision/convert/__init__.py CONVERTERS)
  repo: str | None  # Hugging Face Hub repo id; None: not on the Hub (see `url`)
  filename: str
  tokenizer: str | None  # the zoo entry of the tokenizer a generator needs
  license: str
  params: str
  image_size: int
  fid: float | None = None
  is_: float | None = None
  sample: dict = dataclasses.field(default_factory=dict)
  source: str = ""  # where the numbers come from
  url: str | None = None  # direct link when `repo` is None
  convert_kw: dict = dataclasses.field(default_factory=dict)  # e.g. MAR's EMA weights

  @property
  def family(self) -> str:
    return {"var": "var", "llamagen": "raster", "mar": "mar"}.get(self.kind, "tokenizer")


_VAR_REPO, _LLAMAGEN_REPO = "FoundationVision/var", "FoundationVision/LlamaGen"
# VAR README: FID of the released weights with cfg 1.5, top_p 0.96, top_k 900, more_smooth False.
_VAR_EVAL = dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)
_VAR_SRC = "FoundationVision/VAR README model zoo (FID of the released weights)"
# LlamaGen: eval cfg 2.0 for B/L, 1.75 for XL/XXL, 1.65 for 3B; top_k 0, top_p 1.0, temperature 1.
_LG_SRC = "FoundationVision/LlamaGen README (FID on ImageNet 256; 384px models resized to 256)"
_MAR_SRC = "LTH14/mar README (FID-50K / Inception Score)"


def _var(depth, fid, params, size=256):
  return Entry(
    name=f"var-d{depth}",
    kind="var",
    repo=_VAR_REPO,
    filename=f"var_d{depth}.pth",
    tokenizer="var-vae",
    license="MIT",
    params=params,
    image_size=size,
    fid=fid,
    sample=_VAR_EVAL,
    source=_VAR_SRC,
  )


def _llamagen(model, size, fid, params, cfg):
  suffix = f"-{size}" if model in ("B", "L") and size == 384 else ""  # B/L come in two sizes
  return Entry(
    name=f"llamagen-{model.lower()}{suffix}",
    kind="llamagen",
    repo=_LLAMAGEN_REPO,
    filename=f"c2i_{model}_{size}.pt",
    tokenizer="llamagen-vq16",
    license="MIT",
    params=params,
    image_size=size,
    fid=fid,
    sample=dict(cfg=cfg, top_k=0, top_p=1.0, temperature=1.0),
    source=_LG_SRC,
  )


def _mar(name, url, fid, is_, params, cfg):
  return Entry(
    name=f"mar-{name}",
    kind="mar",
    repo=None,
    filename="checkpoint-last.pth",
    tokenizer="mar-kl16",
    license="MIT",
    params=params,
    image_size=256,
    fid=fid,
    is_=is_,
    sample=dict(
      num_iter=256, num_diffusion_steps=100, cfg=cfg, cfg_schedule="linear", temperature=1.0
    ),
    source=_MAR_SRC,
    url=url,
    convert_kw=dict(ema=True),  # the paper evaluates the EMA weights
  )


_DROPBOX = "https://www.dropbox.com/scl/fi/"
ENTRIES: dict[str, Entry] = {
  e.name: e
  for e in [
    Entry(
      name="var-vae",
      kind="var_vae",
      repo=_VAR_REPO,
      filename="vae_ch160v4096z32.pth",
      tokenizer=None,
      license="MIT",
      params="109M",
      image_size=256,
      source="FoundationVision/VAR README",
    ),
    _var(16, 3.55, "310M"),
    _var(20, 2.95, "600M"),
    _var(24, 2.33, "1.0B"),
    _var(30, 1.97, "2.0B"),
    _var(36, 2.63, "2.3B", size=512),
    Entry(
      name="llamagen-vq16",
      kind="llamagen_vq",
      repo=_LLAMAGEN_REPO,
      filename="vq_ds16_c2i.pt",
      tokenizer=None,
      license="MIT",
      params="72M",
      image_size=256,
      source="FoundationVision/LlamaGen README (rFID 2.19 at 16x16 tokens)",
    ),
    _llamagen("B", 256, 5.46, "111M", 2.0),
    _llamagen("B", 384, 6.09, "111M", 2.0),
    _llamagen("L", 256, 3.80, "343M", 2.0),
    _llamagen("L", 384, 3.07, "343M", 2.0),
    _llamagen("XL", 384, 2.62, "775M", 1.75),
    _llamagen("XXL", 384, 2.34, "1.4B", 1.75),
    _llamagen("3B", 384, 2.18, "3.1B", 1.65),
    Entry(
      name="mar-kl16",
      kind="mar_vae",
      repo=None,
      filename="kl16.ckpt",
      tokenizer=None,
      license="MIT",
      params="",  # not stated by the README
      image_size=256,
      source="LTH14/mar util/download.py",
      url=_DROPBOX + "hhmuvaiacrarfg28qxhwz/kl16.ckpt?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=0",
    ),
    _mar(
      "b",
      _DROPBOX + "f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=0",
      2.31,
      281.7,
      "208M",
      2.9,
    ),
    _mar(
      "l",
      _DROPBOX + "pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=0",
      1.78,
      296.0,
      "479M",
      3.0,
    ),
    _mar(
      "h",
      _DROPBOX + "1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth?rlkey=4lae281yzxb406atp32vzc83o&dl=0",
      1.55,
      303.7,
      "943M",
      3.2,
    ),
  ]
}

# The tokenizer a generator converted from an `hf://` file gets when none is named.
DEFAULT_TOKENIZER = {
  "var": "var-vae",
  "mvar": "var-vae",  # M-VAR uses VAR's VQVAE
  "llamagen": "llamagen-vq16",
  "mar": "mar-kl16",
}


def get(name: str) -> Entry:
  from arvision import errors  # noqa: PLC0415 (keep `import arvision.zoo` free of jax)

  if name not in ENTRIES:
    raise errors.NotFound(
      f"no zoo model {name!r}; known: {sorted(ENTRIES)} (or a workdir, an export dir, or "
      "hf://<repo>/<file>)"
    )
  return ENTRIES[name]
