"""Sample quality: a small digit classifier and the Fréchet distance between its features."""
