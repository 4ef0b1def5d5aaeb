"""Built-in checkpoint families; importing a module registers its family."""
