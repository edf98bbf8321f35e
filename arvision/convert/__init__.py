"""Official PyTorch checkpoints -> arvision checkpoints (`arvision convert KIND PATH --out DIR`)."""

CONVERTERS = {
  "var_vae": "arvision.convert.var:main_var_vae",
  "var": "arvision.convert.var:main_var",
  "hmar": "arvision.convert.hmar:main_hmar",
  "mvar": "arvision.convert.mvar:main_mvar",
  "infinity": "arvision.convert.infinity:main_infinity",
  "mar_vae": "arvision.convert.mar:main_mar_vae",
  "mar": "arvision.convert.mar:main_mar",
  "llamagen_vq": "arvision.convert.llamagen:main_llamagen_vq",
  "llamagen": "arvision.convert.llamagen:main_llamagen",
  "flexvar_vae": "arvision.convert.flexvar:main_flexvar_vae",
  "flexvar": "arvision.convert.flexvar:main_flexvar",
  "infinity_vae": "arvision.convert.bsq:main_infinity_vae",
  "par": "arvision.convert.par:main_par",
  "randar": "arvision.convert.randar:main_randar",
  "nar": "arvision.convert.nar:main_nar",
  "xar": "arvision.convert.xar:main_xar",
  "flowar": "arvision.convert.flowar:main_flowar",
  "arflow": "arvision.convert.arflow:main_arflow",
}
