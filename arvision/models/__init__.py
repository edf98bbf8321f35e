"""Pure-functional Flax (linen) models: one file per family plus shared `layers`.

Family modules are imported lazily by `arvision.families.build`; import them explicitly, e.g.
`from arvision.models import var`.
"""
