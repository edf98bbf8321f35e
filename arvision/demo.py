"""`arvision demo --model var-d16`: a Gradio app over a `Model` (class picker, sampling knobs,
a batch grid, and for next-scale and raster models zero-shot inpainting with a drawn mask).

`Demo` holds the logic and needs no Gradio (the tests call it too); `build_app` lays it out;
`serve` loads a model, compiles the sampler once and starts the server. Sampling calls the
family's jitted `sample_tokens`, whose knobs (cfg, top_k, top_p, temperature) are traced: after
the first compile per batch size a new setting, label or seed runs without recompiling.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from arvision import errors, visualize

# The knobs the app can show: name -> (label, minimum, maximum, step). A family gets those its
# `sample_tokens` accepts; top_k's maximum is the vocabulary size.
KNOBS = {
  "cfg": ("guidance scale (cfg)", 0.0, 10.0, 0.05),
  "top_k": ("top-k (0 = off)", 0, None, 1),
  "top_p": ("top-p", 0.0, 1.0, 0.01),
  "temperature": ("temperature", 0.05, 3.0, 0.05),
}
BATCH_SIZES = (1, 2, 4, 8, 16)  # one sampler compile per size used
# Small samples (a 64 px model) fill their panel, with sharp pixels; the API returns them as made.
CSS = (
  ".arvision-grid img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
)


def imagenet_names() -> list[str] | None:
  """The 1000 ImageNet-1k class names in index order, from the list Gradio ships
  (`gradio/media_assets/data/imagenet_labels.json`, Apache-2.0); None when it is missing."""
  try:
    path = importlib.resources.files("gradio") / "media_assets" / "data" / "imagenet_labels.json"
    names = json.loads(path.read_text())
  except (ModuleNotFoundError, FileNotFoundError, ValueError):
    return None
  return [str(n) for n in names] if len(names) == 1000 else None


def class_names(config, num_classes: int) -> list[str]:
  """A display name per class index: ImageNet's for 1000-class models (every official
  checkpoint), Fashion-MNIST's for models trained on it, else `class <i>`."""
  from arvision.data.fashion_mnist import CLASS_NAMES  # noqa: PLC0415

  names = None
  if num_classes == 1000:
    names = imagenet_names()
  elif str(config.data.get("source", "")) == "fashion_mnist" and num_classes == len(CLASS_NAMES):
    names = list(CLASS_NAMES)
  return names or [f"class {i}" for i in range(num_classes)]


def sampler_settings(family) -> dict:
  """name -> default of every keyword setting `family.sample_tokens` takes. A sampler written
  as `**settings` names them in its module's `SAMPLE_SETTINGS` table (VAR)."""
  params = list(inspect.signature(family.sample_tokens).parameters.values())[3:]
  out = {
    p.name: p.default
    for p in params
    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
  }
  if any(p.kind == p.VAR_KEYWORD for p in params):
    out.update(getattr(sys.modules[type(family).__module__], "SAMPLE_SETTINGS", {}))
  return out


def keep_masks(keep_HxW: np.ndarray, patch_nums) -> list[np.ndarray]:
  """Per scale, bool `[pn*pn]`: a token is kept when at least half of its cell is kept.

  Coarse tokens span both regions; keeping those mostly outside the drawn region holds the
  kept region's layout and colours while the drawn region is regenerated at the finer scales.
  """
  img = Image.fromarray(np.asarray(keep_HxW, np.float32))  # mode "F": BOX averages fractions
  return [(np.asarray(img.resize((pn, pn), Image.BOX)) >= 0.5).reshape(-1) for pn in patch_nums]


class Demo:
  """What the app does, without Gradio: sample a grid, inpaint an image."""

  def __init__(self, model, defaults: dict | None = None):
    self.model, self.family = model, model.family
    self.names = class_names(model.config, model.num_classes)
    settings = sampler_settings(self.family)
    defaults = {**settings, **self.family.sample_defaults(), **(defaults or {})}
    self.vocab = int(self._tokenizer_config().get("vocab_size", 0) or 0)
    self.knobs = {}  # name -> (label, minimum, maximum, step, default)
    for name, (label, lo, hi, step) in KNOBS.items():
      if name not in settings:
        continue
      hi = self.vocab if hi is None else hi
      if hi == 0:  # top_k without a known vocabulary size
        continue
      value = min(max(float(defaults.get(name, lo) or 0), lo), hi)
      self.knobs[name] = (label, lo, hi, step, int(value) if step == 1 else value)
    # Zero-shot inpainting: next-scale models force known tokens per scale, raster ones (any
    # decoding order, RandAR's random one included) per position.
    self.inpainting = None
    if "known_idx" in settings and hasattr(self.family, "scales"):
      self.inpainting = "scales"
    elif {"known", "known_mask", "order"} <= set(settings) and hasattr(self.family, "grid_size"):
      self.inpainting = "raster"
    self.can_inpaint = self.inpainting is not None
    self.image_size = int(model.config.data.image_size)
    self.channels = int(model.config.data.get("channels", 3))

  def _tokenizer_config(self):
    tok = getattr(self.family, "tokenizer", None)
    return tok.config.model if tok is not None else {}

  def choices(self) -> list[tuple[str, int]]:
    """(display name, label) for the class picker; the last is the unconditional class."""
    rows = [(f"{i}: {n}", i) for i, n in enumerate(self.names)]
    return rows + [("unconditional", self.model.num_classes)]

  def default_label(self) -> int:
    return 207 if self.model.num_classes == 1000 else 0  # ImageNet: golden retriever

  def _settings(self, knobs: dict) -> dict:
    unknown = sorted(set(knobs) - set(self.knobs))
    if unknown:
      raise errors.UserError(f"settings {unknown} are not knobs of this model: {list(self.knobs)}")
    return {k: int(v) if self.knobs[k][3] == 1 else float(v) for k, v in knobs.items()}

  def _labels(self, label, batch: int) -> np.ndarray:
    batch = int(batch)
    if batch < 1:
      raise errors.UserError(f"batch={batch} must be a positive int")
    return self.model.check_labels(np.full((batch,), int(label)))

  def sample(self, label, batch: int, seed: int, known: dict | None = None, **knobs):
    """`(images uint8 [B, H, W, C], sampler output)` for `batch` samples of class `label`;
    `known`: the sampler's teacher-forcing arguments (inpainting)."""
    labels = self._labels(label, batch)
    settings = {**self._settings(knobs), **(known or {})}
    out = self.family.sample_tokens(
      self.model.params, jnp.asarray(labels), jax.random.key(int(seed)), **settings
    )
    return np.asarray(out[0]), out

  def grid(self, images: np.ndarray) -> np.ndarray:
    """A near-square grid, 3-channel uint8 (the browser shows RGB)."""
    g = visualize.grid(images, nrow=int(np.ceil(np.sqrt(len(images)))))
    return np.repeat(g, 3, axis=-1) if g.shape[-1] == 1 else g

  def generate(self, label, batch: int, seed: int, **knobs) -> np.ndarray:
    return self.grid(self.sample(label, batch, seed, **knobs)[0])

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """uint8 `[H, W, 1|3|4]` -> the model's input `[1, S, S, C]` in [-1, 1] (centre square,
    resized)."""
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("L" if self.channels == 1 else "RGB")
    img = _square(img).resize((self.image_size,) * 2, Image.BICUBIC)
    x = np.asarray(img, np.float32).reshape(1, self.image_size, self.image_size, self.channels)
    return x / 127.5 - 1.0

  @functools.cached_property
  def _encode(self):
    """jit of tokenizer params, images -> the token list the sampler forces (one per scale)."""
    if self.inpainting == "scales":
      return jax.jit(getattr(self.family, "sample_scales", self.family.scales).targets)
    return jax.jit(lambda tok_p, x: [self.family.tokenizer.encode_idx(tok_p, x)])

  @property
  def patch_nums(self) -> tuple[int, ...]:
    """The token grids the sampler walks: VAR's scales, or the raster model's one grid."""
    if self.inpainting == "raster":
      return (int(self.family.grid_size),)
    return tuple(getattr(self.family, "sample_patch_nums", self.family.patch_nums))

  def encode(self, image: np.ndarray) -> list[np.ndarray]:
    """Token indices `[pn*pn]` (row-major) of an image, per grid of `patch_nums`."""
    idx = self._encode(self.model.params["tokenizer"], jnp.asarray(self.prepare(image)))
    return [np.asarray(i)[0] for i in idx]

  def _known(self, idx, masks, B: int, seed: int) -> dict:
    """The sampler's teacher-forcing arguments for `B` copies of the image's tokens."""
    if self.inpainting == "scales":  # per scale, row-major
      return dict(
        known_idx=[np.broadcast_to(i, (B, i.size)) for i in idx],
        known_mask=[np.broadcast_to(m, (B, m.size)) for m in masks],
      )
    # Raster models take them in decoding order: the order the sampler would draw for this seed
    # (RandAR: random per example), passed explicitly so both agree.
    from arvision.sampling import orders  # noqa: PLC0415

    N = idx[0].size
    rng = jax.random.fold_in(jax.random.key(int(seed)), N)
    order = np.asarray(jnp.broadcast_to(orders.draw(self.family.order, rng, B, N), (B, N)))
    codes = np.take_along_axis(np.broadcast_to(idx[0], (B, N)), order, axis=1)
    return dict(known=codes, known_mask=masks[0][order], order=order)

  def inpaint(self, image: np.ndarray, drawn: np.ndarray, label, batch: int, seed: int, **knobs):
    """Zero-shot inpainting: tokens outside the drawn region are the image's own (at every scale
    for VAR, `keep_masks`), the model samples the rest.

    Args:
      image: uint8 `[H, W, C]`; drawn: bool `[H, W]`, True where to regenerate.
    Returns:
      `(grid uint8, info)`; info holds the finest grid's kept mask and the input's and each
      sample's tokens there (`[pn, pn]` lists).
    """
    if not self.can_inpaint:
      raise errors.UserError(f"family {self.model.config.family!r} has no zero-shot inpainting")
    drawn = np.asarray(drawn, bool)
    if drawn.shape != np.asarray(image).shape[:2]:
      raise errors.UserError(f"mask {drawn.shape} and image {np.shape(image)[:2]} differ in size")
    if not drawn.any():
      raise errors.UserError("draw over the region to regenerate first (the mask is empty)")
    keep = np.asarray(
      _square(Image.fromarray((~drawn).astype(np.uint8) * 255)).resize(
        (self.image_size,) * 2, Image.NEAREST
      )
    )
    masks = keep_masks(keep > 127, self.patch_nums)
    idx = self.encode(image)
    B = int(batch)
    images, out = self.sample(label, B, seed, self._known(idx, masks, B, seed), **knobs)
    tokens = out[1][-1] if self.inpainting == "scales" else out[1]  # raster: [B, N] row-major
    pn = self.patch_nums[-1]
    info = {
      "finest_scale": pn,
      "kept": masks[-1].reshape(pn, pn).tolist(),
      "input_tokens": idx[-1].reshape(pn, pn).tolist(),
      "sample_tokens": np.asarray(tokens).reshape(B, pn, pn).tolist(),
    }
    return self.grid(images), info


def _square(img: Image.Image) -> Image.Image:
  """The centre square of an image."""
  s = min(img.size)
  left, top = (img.width - s) // 2, (img.height - s) // 2
  return img.crop((left, top, left + s, top + s))


def drawn_mask(editor_value) -> tuple[np.ndarray, np.ndarray]:
  """(background uint8 `[H, W, C]`, drawn bool `[H, W]`) from a Gradio ImageEditor value: the
  drawn region is where any brush layer is opaque."""
  if not editor_value or editor_value.get("background") is None:
    raise errors.UserError("upload an image (or press 'edit the first sample') first")
  bg = np.asarray(editor_value["background"])
  drawn = np.zeros(bg.shape[:2], bool)
  for layer in editor_value.get("layers") or []:
    layer = np.asarray(layer)
    if layer.shape[:2] != drawn.shape:
      raise errors.UserError(f"a mask layer is {layer.shape[:2]}, the image {drawn.shape}")
    drawn |= layer[..., -1] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.any(-1)
  return bg[..., :3] if bg.ndim == 3 and bg.shape[-1] == 4 else bg, drawn


def build_app(demo: Demo, title: str = "arvision"):
  """The Gradio Blocks app; its HTTP API has `/generate` and, when the model can, `/inpaint`."""
  import gradio as gr  # noqa: PLC0415 (the `demo` extra)

  def guarded(fn):
    @functools.wraps(fn)
    def call(*args):
      try:
        return fn(*args)
      except errors.UserError as e:  # shown in the page, not a traceback
        raise gr.Error(str(e)) from None

    return call

  names = list(demo.knobs)

  @guarded
  def generate(label, batch, seed, *values):
    images, _ = demo.sample(label, batch, seed, **dict(zip(names, values, strict=True)))
    return demo.grid(images), images[0]

  @guarded
  def inpaint(editor, label, batch, seed, *values):
    image, drawn = drawn_mask(editor)
    return demo.inpaint(image, drawn, label, batch, seed, **dict(zip(names, values, strict=True)))

  def edit_first(first):
    if first is None:
      raise gr.Error("generate samples first")
    first = np.repeat(first, 3, axis=-1) if first.shape[-1] == 1 else first
    return {"background": first, "layers": [], "composite": first}

  m = demo.model
  with gr.Blocks(title=title, analytics_enabled=False) as app:
    gr.Markdown(
      f"## {title}\n{m.config.family} · {demo.image_size} px · {m.num_classes} classes · "
      f"step {m.step}. The sampler compiles once per batch size (and for inpainting); "
      "then every setting is live."
    )
    first = gr.State(None)
    with gr.Row():
      with gr.Column(scale=1):
        label = gr.Dropdown(demo.choices(), value=demo.default_label(), label="class")
        batch = gr.Radio(list(BATCH_SIZES), value=4, label="batch")
        seed = gr.Number(0, precision=0, label="seed")
        knobs = [
          gr.Slider(lo, hi, value=v, step=step, label=text)
          for text, lo, hi, step, v in demo.knobs.values()
        ]
        go = gr.Button("Generate", variant="primary")
      grid = gr.Image(
        label="samples",
        type="numpy",
        format="png",
        interactive=False,
        height=480,
        scale=2,
        elem_classes="arvision-grid",
      )
    inputs = [label, batch, seed, *knobs]
    go.click(generate, inputs, [grid, first], api_name="generate")
    app.load(generate, inputs, [grid, first], api_name=False)
    if demo.can_inpaint:
      with gr.Accordion("Inpainting: paint over what to regenerate", open=True):
        with gr.Row():
          editor = gr.ImageEditor(
            type="numpy",
            format="png",
            label="image (upload one, or take the first sample) and mask",
            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),
            sources=("upload", "clipboard"),
          )
          painted = gr.Image(
            label="inpainted",
            type="numpy",
            format="png",
            interactive=False,
            elem_classes="arvision-grid",
          )
        with gr.Row():
          take = gr.Button("Edit the first sample")
          fill = gr.Button("Inpaint", variant="primary")
        with gr.Accordion("tokens at the finest scale", open=False):
          tokens = gr.JSON(label="kept mask, input and sample tokens")
      take.click(edit_first, [first], [editor], api_name=False)
      fill.click(inpaint, [editor, *inputs], [painted, tokens], api_name="inpaint")
  return app


def serve(path: str, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
  """Loads `path` (zoo name, hf:// file, workdir or export dir), compiles the sampler and
  starts the app; returns `(app, demo)` (with `block=False` the server runs in a thread)."""
  try:
    import gradio  # noqa: F401, PLC0415
  except ModuleNotFoundError:
    raise errors.UserError(
      "the demo needs Gradio: pip install 'arvision[demo]' (or -c constraints.txt -e '.[demo]')"
    ) from None
  from arvision import api, zoo  # noqa: PLC0415

  model = api.load(path)
  entry = zoo.ENTRIES.get(path)
  demo = Demo(model, defaults=dict(entry.sample) if entry else None)
  knobs = {k: v[-1] for k, v in demo.knobs.items()}
  print(f"compiling the sampler ({model.config.family}, batch 4) ...", flush=True)
  demo.sample(demo.default_label(), 4, 0, **knobs)
  app = build_app(demo, title=f"arvision demo: {path}")
  app.launch(
    server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block, css=CSS
  )
  return app, demo
