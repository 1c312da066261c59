"""The embedded demo checkpoint's recipe: every piece made by the project's own scripts, on CPU."""
