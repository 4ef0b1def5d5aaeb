"""Built-in checkpoint families; importing a module registers its family."""

from tl_loop.loading.families import feedforward, hrm_text, huginn, ouro  # noqa: F401
