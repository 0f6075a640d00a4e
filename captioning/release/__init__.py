"""A registered version made into a bento and a container image, and served as a local stack."""
