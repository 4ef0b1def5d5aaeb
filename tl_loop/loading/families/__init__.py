"""Built-in checkpoint families; importing a module registers its family."""

from tl_loop.loading.families import feedforward, hrm_text, huginn, native, ouro  # noqa: F401
