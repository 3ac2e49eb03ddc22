"""Where jobs run: Ray cluster connection and the resources each engine replica gets."""
