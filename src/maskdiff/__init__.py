"""maskdiff: masked (absorbing-state) diffusion language models, from corpus to tracked model."""

__version__ = "0.1.0"
