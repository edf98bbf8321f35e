"""Official PyTorch checkpoints -> arvision checkpoints (`arvision convert KIND PATH --out DIR`)."""

CONVERTERS = {
  "var_vae": "arvision.convert.var:main_var_vae",
  "var": "arvision.convert.var:main_var",
}
