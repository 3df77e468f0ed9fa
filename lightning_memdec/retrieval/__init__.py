"""Nearest-neighbour search: FAISS indexes and their plan, exact search by blocked matrix products."""
