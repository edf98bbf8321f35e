"""Input data: sources (`fashion_mnist`, `tfds:<name>`, `folder:<path>`, `synthetic`, `tokens:<dir>`)
and grain pipelines with per-process sharding and checkpointable iterators.

```python
it = make_train_iter(config.data, seed=config.seed)   # infinite; it.get_state() / set_state()
batch = next(it)   # {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}
for batch in make_eval_iter(config.data):             # finite; padded, with "mask": bool [b]
  ...
```
"""

from arvision.data.pipeline import (
  image_data_config,
  input_spec,
  load_images,
  local_batch_size,
  make_eval_iter,
  make_train_iter,
  num_examples,
)
from arvision.data.sources import SOURCES, get_source, register_source

__all__ = [
  "SOURCES",
  "get_source",
  "image_data_config",
  "input_spec",
  "load_images",
  "local_batch_size",
  "make_eval_iter",
  "make_train_iter",
  "num_examples",
  "register_source",
]
