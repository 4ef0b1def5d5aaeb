"""Built-in checkpoint families; importing a module registers its family."""
from tl_loop.loading.families import ouro  # noqa: F401
from tl_loop.loading.families import huginn  # noqa: F401
from tl_loop.loading.families import feedforward  # noqa: F401
from tl_loop.loading.families import hrm_text  # noqa: F401
