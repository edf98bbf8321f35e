"""Official checkpoints from the Hugging Face Hub -> converted arvision checkpoints, cached.

`resolve("var-d16")` (a zoo name, `arvision/zoo.py`) or `resolve("hf://<repo>/<file>")` returns
a directory `arvision.load` reads:
- downloads with `huggingface_hub.hf_hub_download`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), its
  resumable downloads, `HF_ENDPOINT` (a mirror) and `HF_HUB_OFFLINE=1` (cache only) behave as for
  any Hub library; both are read when called, not when imported;
- checks the file against the Hub's ETag, which for LFS files is the sha256 of the content: a
  mismatch is an error naming the file, and the bad file is removed from the Hub cache;
- converts once with `arvision/convert/` and caches the result under
  `$ARVISION_CACHE` (default `~/.cache/arvision`)`/converted/<kind>-<sha256[:16]>...`, keyed by
  the source file's sha256 (and the tokenizer's, for generators). The result is written to a
  temporary directory and renamed into place, so an interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

from arvision import errors, zoo

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Counted so tests (and curious users) can see that a warm cache converts nothing.
conversions = 0


def cache_root() -> str:
  if os.environ.get("ARVISION_CACHE"):
    return os.environ["ARVISION_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "arvision")


def hf_cache_dir() -> str:
  """huggingface_hub's cache folder, read from the environment now (its constants module reads
  it once, at import)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "huggingface",
  )
  return os.path.join(home, "hub")


def offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def parse_hf_url(url: str) -> tuple[str, str, str | None]:
  """`hf://owner/name[@revision]/path/to/file` -> (repo, filename, revision)."""
  rest = url[len("hf://") :]
  parts = rest.split("/")
  if len(parts) < 3 or not all(parts):
    raise errors.UserError(f"{url!r} is not hf://<owner>/<repo>[@revision]/<file>")
  name, _, revision = parts[1].partition("@")
  return f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None


def download(repo: str, filename: str, revision: str | None = None) -> str:
  """The local path of `repo/filename` (downloaded, or from the Hub cache)."""
  try:
    import huggingface_hub as hfh  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("downloading from the Hub needs huggingface_hub: pip install arvision") from e
  try:
    return hfh.hf_hub_download(
      repo,
      filename,
      revision=revision,
      cache_dir=hf_cache_dir(),
      endpoint=os.environ.get("HF_ENDPOINT") or None,
      local_files_only=offline(),
    )
  except hfh.errors.LocalEntryNotFoundError as e:
    raise errors.NotFound(
      f"{repo}/{filename} is not in the Hub cache ({hf_cache_dir()}) and "
      f"{'HF_HUB_OFFLINE is set' if offline() else 'the Hub could not be reached'}; connect "
      "once (or unset HF_HUB_OFFLINE) to download it"
    ) from e
  except (hfh.errors.EntryNotFoundError, hfh.errors.RepositoryNotFoundError) as e:
    raise errors.NotFound(f"{repo}/{filename} is not on the Hub: {e}") from e
  except (OSError, hfh.errors.HfHubHTTPError, ValueError) as e:
    raise errors.UserError(f"downloading {repo}/{filename} failed: {e}") from e


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _forget(path: str) -> None:
  """Removes a downloaded file from the Hub cache: its blob and the snapshot link to it."""
  blob = os.path.realpath(path)
  for p in {path, blob}:
    if os.path.lexists(p):
      os.remove(p)


def source_key(path: str, what: str) -> str:
  """The sha256 of a downloaded file. The Hub cache names blobs by their ETag, the sha256 of an
  LFS file, so a cached file's key is its blob name: checked against the content the first time
  it is converted (`verify`), and free on later loads."""
  blob = os.path.basename(os.path.realpath(path))
  return blob if SHA256.match(blob) else sha256_file(path)


def verify(path: str, key: str, what: str) -> None:
  digest = sha256_file(path)
  if digest != key:
    _forget(path)
    raise errors.UserError(
      f"{what}: the downloaded file's sha256 {digest[:16]}... is not the Hub's {key[:16]}... "
      "(a damaged download or a changed file); it was removed from the cache, load again to "
      "download it again"
    )


def _converted_dir(kind: str, key: str, tok_key: str | None) -> str:
  name = f"{kind}-{key[:16]}" + (f"-tok-{tok_key[:16]}" if tok_key else "")
  return os.path.join(cache_root(), "converted", name)


def _convert_into(out: str, fn) -> None:
  """Runs `fn(tmp_out)` and renames the result to `out`; nothing is left at `out` on error."""
  global conversions
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  try:
    fn(os.path.join(tmp, "ckpt"))
    conversions += 1
    try:
      os.replace(os.path.join(tmp, "ckpt"), out)
    except OSError:
      if not os.path.isdir(out):  # else another process converted the same file first
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def detect_kind(path: str) -> str:
  """The converter kind of an official checkpoint file, from its keys."""
  from arvision.convert import common  # noqa: PLC0415

  obj = common.torch_load(path)
  if isinstance(obj, dict) and "model_ema" in obj:
    return "mar"  # LTH14/mar training checkpoints (converted with their EMA weights)

  keys = set(common.unwrap_state_dict(obj, path))
  rules = [
    ("mvar", "blocks.0.mamba.in_proj.weight"),  # before var: M-VAR blocks have attn too
    ("var", "blocks.0.attn.mat_qkv.weight"),
    ("var_vae", "quantize.quant_resi."),
    ("llamagen", "tok_embeddings.weight"),
    ("llamagen_vq", "encoder.conv_blocks."),
    ("mar", "diffloss.net.input_proj.weight"),
    ("mar_vae", "encoder.down.0.block.0.conv1.weight"),
  ]
  for kind, marker in rules:
    if any(k == marker or k.startswith(marker) for k in keys):
      return kind
  raise errors.UserError(
    f"{path}: not a checkpoint arvision converts (VAR, LlamaGen or MAR and their tokenizers)"
  )


def _convert_fn(kind: str, source: str, tokenizer_dir: str | None, convert_kw: dict):
  import importlib  # noqa: PLC0415

  from arvision.convert import CONVERTERS  # noqa: PLC0415

  module, name = CONVERTERS[kind].split(":")
  fn = getattr(importlib.import_module(module), name)
  kw = dict(convert_kw)
  if tokenizer_dir is not None:
    kw["vae"] = tokenizer_dir
  return lambda out: fn(source, out, **kw)


def _resolve_file(
  repo: str,
  filename: str,
  revision: str | None,
  kind: str | None,
  tokenizer: str | None,
  convert_kw: dict,
  what: str,
) -> str:
  path = download(repo, filename, revision)
  key = source_key(path, what)
  if kind is None:
    kind = detect_kind(path)
    if kind == "mar":
      convert_kw = dict(convert_kw, ema=True)  # what the MAR paper evaluates
  tok_dir = tok_key = None
  if kind in zoo.DEFAULT_TOKENIZER:
    tok_dir = resolve(tokenizer or zoo.DEFAULT_TOKENIZER[kind])
    tok_key = _read_source(tok_dir).get("sha256", os.path.basename(tok_dir))
  out = _converted_dir(kind, key, tok_key)
  if os.path.isdir(out):
    return out
  if SHA256.match(key):
    verify(path, key, what)
  from tqdm.auto import tqdm  # noqa: PLC0415

  with tqdm(total=1, desc=f"convert {filename}", unit="ckpt") as bar:

    def run(tmp_out):
      _convert_fn(kind, path, tok_dir, convert_kw)(tmp_out)
      with open(os.path.join(tmp_out, "source.json"), "w") as f:
        json.dump(dict(repo=repo, filename=filename, revision=revision, kind=kind, sha256=key), f)

    _convert_into(out, run)
    bar.update(1)
  return out


def _read_source(directory: str) -> dict:
  try:
    with open(os.path.join(directory, "source.json")) as f:
      return json.load(f)
  except OSError:
    return {}


def resolve(name: str, tokenizer: str | None = None) -> str:
  """A zoo name, `hf://<repo>/<file>`, or a local path -> a directory `arvision.load` reads."""
  if name.startswith("hf://"):
    repo, filename, revision = parse_hf_url(name)
    return _resolve_file(repo, filename, revision, None, tokenizer, {}, name)
  prefixes = {n.split("-")[0] + "-" for n in zoo.ENTRIES}
  if os.path.exists(name) or os.sep in name or not name.startswith(tuple(prefixes)):
    return name  # a workdir or export dir (arvision.load names a missing one)
  entry = zoo.get(name)
  if entry.repo is None:
    raise errors.UserError(
      f"{name} is not on the Hugging Face Hub (its authors publish it at {entry.url}); download "
      f"{entry.filename} and convert it with `arvision convert {entry.kind} {entry.filename}"
      + (" --vae <converted tokenizer dir>" if entry.tokenizer else "")
      + (" --ema" if entry.convert_kw.get("ema") else "")
      + " --out DIR`, then arvision.load(DIR)"
    )
  return _resolve_file(
    entry.repo,
    entry.filename,
    None,
    entry.kind,
    tokenizer or entry.tokenizer,
    entry.convert_kw,
    f"{name} ({entry.repo}/{entry.filename})",
  )


def cached(entry: zoo.Entry) -> str:
  """'converted' / 'downloaded' / '' for `arvision zoo` (no network, no hashing)."""
  if entry.repo is None:
    return ""
  folder = os.path.join(hf_cache_dir(), "models--" + entry.repo.replace("/", "--"), "snapshots")
  paths = (
    [os.path.join(folder, s, entry.filename) for s in sorted(os.listdir(folder))]
    if (os.path.isdir(folder))
    else []
  )
  paths = [p for p in paths if os.path.exists(p)]
  if not paths:
    return ""
  blob = os.path.basename(os.path.realpath(paths[-1]))
  conv = os.path.join(cache_root(), "converted")
  names = os.listdir(conv) if os.path.isdir(conv) else []
  if any(n.startswith(f"{entry.kind}-{blob[:16]}") and ".tmp-" not in n for n in names):
    return "converted"
  return "downloaded"
