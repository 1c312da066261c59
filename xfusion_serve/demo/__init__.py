"""The embedded demo: the shapes world, its datasets, the recipe that builds the checkpoint, its evaluation."""
