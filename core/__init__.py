"""What every layer shares and that imports nothing of the project: the errors, ARKit's names,
the format's constants."""
